/* gemma3_device.c — copies a loaded gemma3_model's weights into CUDA memory (in progress). */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif
typedef int gemma3_device_placeholder;
