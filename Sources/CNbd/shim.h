#ifndef LIFEBOAT_CNBD_SHIM_H
#define LIFEBOAT_CNBD_SHIM_H
#include <libnbd.h>
#endif
