#ifndef LIFEBOAT_CVIRT_SHIM_H
#define LIFEBOAT_CVIRT_SHIM_H
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#endif
