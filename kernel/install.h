/* install.h — `lathe install`: writes the kernelspec. */
#ifndef LATHE_INSTALL_H
#define LATHE_INSTALL_H
int install_main(int argc, char **argv);
#endif
