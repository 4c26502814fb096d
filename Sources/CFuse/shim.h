#ifndef LIFEBOAT_CFUSE_SHIM_H
#define LIFEBOAT_CFUSE_SHIM_H
// libfuse 3.14 from Debian 12; 3.12 is the API level with fuse_loop_cfg and lseek.
#define FUSE_USE_VERSION 312
#include <fuse.h>

// fuse_new and fuse_loop_mt are function-like macros (symbol versioning), which Swift cannot
// call: these wrappers let the C compiler pick the versioned symbols.
// Returns NULL on failure (libfuse prints why).
static inline struct fuse *lifeboat_fuse_new(struct fuse_args *args, const struct fuse_operations *op, void *private_data) {
    return fuse_new(args, op, sizeof(*op), private_data);
}
// Returns 0 when the file system was unmounted, -errno or 1 on failure.
static inline int lifeboat_fuse_loop_mt(struct fuse *f, struct fuse_loop_config *config) {
    return fuse_loop_mt(f, config);
}
#endif
