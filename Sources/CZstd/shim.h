#ifndef LIFEBOAT_CZSTD_SHIM_H
#define LIFEBOAT_CZSTD_SHIM_H
// For ZSTD_getCParams: Debian's libzstd exports the experimental API; it is used only to read a
// level's parameter row, so that a compressor with a dictionary does not switch rows.
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>
#include <zdict.h>
#endif
