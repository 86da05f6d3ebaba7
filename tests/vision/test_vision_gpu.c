/* test_vision_gpu.c — test_vision_device.c on the CUDA backend (make check-gpu): the image
 * tower and the image block's attention on the GPU against the host model on the CPU. */
#define VISION_TEST_CUDA 1
#include "tests/vision/test_vision_device.c"
