/*
 * bc_layer_null.c — a layer that does not encrypt: the stored bytes are the plaintext.
 * For benchmarks only (the cost of the engine without the cipher); the mount refuses
 * it without an explicit flag. It keeps no state: ctx is unused.
 */
#include "bc_engine.h"

#include <errno.h>

static int null_encrypt(void *ctx, uint8_t *buf, size_t nsectors, uint64_t sector_no, uint8_t *meta,
                        size_t meta_stride)
{
    (void)ctx, (void)buf, (void)nsectors, (void)sector_no, (void)meta, (void)meta_stride;
    return 0;
}

static int null_decrypt(void *ctx, uint8_t *buf, size_t nsectors, uint64_t sector_no, const uint8_t *meta,
                        size_t meta_stride)
{
    (void)ctx, (void)buf, (void)nsectors, (void)sector_no, (void)meta, (void)meta_stride;
    return 0;
}

static void null_destroy(void *ctx)
{
    (void)ctx;
}

static const struct bc_layer_ops null_ops = {
    .name = "null",
    .meta_bytes = 0,
    .encrypt = null_encrypt,
    .decrypt = null_decrypt,
    .destroy = null_destroy,
};

int bc_layer_null_new(uint32_t sector_size, struct bc_layer *out)
{
    if (out == NULL || (sector_size != 512 && sector_size != 4096))
        return -EINVAL;
    out->ops = &null_ops;
    out->ctx = NULL;
    return 0;
}
