#ifndef LIFEBOAT_CFUSE_SHIM_H
#define LIFEBOAT_CFUSE_SHIM_H
// libfuse 3.14 from Debian 12; 3.12 is the API level with lseek.
#define FUSE_USE_VERSION 312
#include <fuse.h>
// The session's receive and process calls, for the request loop (FuseSession.swift), and the
// epoll its threads sleep in (Glibc's Swift module leaves <sys/epoll.h> out).
#include <fuse_lowlevel.h>
#include <sys/epoll.h>

// fuse_new is a function-like macro (symbol versioning), which Swift cannot call: this wrapper
// lets the C compiler pick the versioned symbol.
// Returns NULL on failure (libfuse prints why).
static inline struct fuse *lifeboat_fuse_new(struct fuse_args *args, const struct fuse_operations *op, void *private_data) {
    return fuse_new(args, op, sizeof(*op), private_data);
}
#endif
