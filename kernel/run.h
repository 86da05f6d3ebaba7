/* run.h — the command-line doors: `lathe run FILE|-` (cells without Jupyter) and
 * `lathe logits MODEL --ids ... --out FILE.npy` (parity checks against PyTorch). */
#ifndef LATHE_RUN_H
#define LATHE_RUN_H
int run_main(int argc, char **argv);
int logits_main(int argc, char **argv);
#endif
