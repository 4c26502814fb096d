#ifndef LIFEBOAT_CFUSE_SHIM_H
#define LIFEBOAT_CFUSE_SHIM_H
// libfuse 3.14 from Debian 12; 31 is the API level with lseek and the 3.x init signature.
#define FUSE_USE_VERSION 31
#include <fuse.h>
#include <fuse_lowlevel.h>
#endif
