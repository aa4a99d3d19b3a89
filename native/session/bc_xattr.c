/* bc_xattr.c — reading a disk's packed extended attributes (see bc_xattr.h). */
#include "bc_xattr.h"

#include <errno.h>
#include <string.h>

static int has_prefix(const char *name, const char *prefix)
{
    return strncmp(name, prefix, strlen(prefix)) == 0;
}

int bc_xattr_is_trusted(const char *name)
{
    return has_prefix(name, "trusted.");
}

int bc_xattr_name_ok(const char *name)
{
    size_t n = strlen(name);
    if (n > BC_XATTR_NAME_MAX)
        return -ERANGE;
    if (has_prefix(name, "user.") && n > strlen("user."))
        return 0;
    if (has_prefix(name, "trusted.") && n > strlen("trusted."))
        return 0;
    return -EOPNOTSUPP;
}

/* One record at blob[off]: its name (not NUL-terminated) and value. 0, or -EINVAL when it
 * runs past the end. */
struct rec {
    const uint8_t *name, *value;
    size_t name_len, value_len, next;
};

static int rec_at(const uint8_t *blob, size_t blob_len, size_t off, struct rec *r)
{
    if (blob_len - off < BC_XATTR_REC_HDR)
        return -EINVAL;
    const uint8_t *p = blob + off;
    r->name_len = (size_t)p[0] | (size_t)p[1] << 8;
    r->value_len = (size_t)p[2] | (size_t)p[3] << 8 | (size_t)p[4] << 16 | (size_t)p[5] << 24;
    size_t left = blob_len - off - BC_XATTR_REC_HDR;
    if (r->name_len > left || r->value_len > left - r->name_len)
        return -EINVAL;
    r->name = p + BC_XATTR_REC_HDR;
    r->value = r->name + r->name_len;
    r->next = off + BC_XATTR_REC_HDR + r->name_len + r->value_len;
    return 0;
}

static int rec_is(const struct rec *r, const char *name, size_t name_len)
{
    return r->name_len == name_len && memcmp(r->name, name, name_len) == 0;
}

int bc_xattr_valid(const uint8_t *blob, size_t blob_len)
{
    if (blob == NULL)
        return blob_len == 0 ? 0 : -EINVAL;
    for (size_t off = 0; off < blob_len;) {
        struct rec r;
        char name[BC_XATTR_NAME_MAX + 1];
        if (rec_at(blob, blob_len, off, &r) < 0 || r.name_len == 0 ||
            r.name_len > BC_XATTR_NAME_MAX || memchr(r.name, '\0', r.name_len) != NULL)
            return -EINVAL;
        memcpy(name, r.name, r.name_len);
        name[r.name_len] = '\0';
        if (bc_xattr_name_ok(name) != 0)
            return -EINVAL;
        for (size_t o2 = 0; o2 < off;) {   /* unique (blobs hold a few records) */
            struct rec q;
            (void)rec_at(blob, blob_len, o2, &q);
            if (rec_is(&q, name, r.name_len))
                return -EINVAL;
            o2 = q.next;
        }
        off = r.next;
    }
    return 0;
}

int bc_xattr_get(const uint8_t *blob, size_t blob_len, const char *name, const uint8_t **value,
                 size_t *value_len)
{
    size_t n = strlen(name);
    for (size_t off = 0; blob != NULL && off < blob_len;) {
        struct rec r;
        if (rec_at(blob, blob_len, off, &r) < 0)
            break;
        if (rec_is(&r, name, n)) {
            *value = r.value;
            *value_len = r.value_len;
            return 0;
        }
        off = r.next;
    }
    return -ENODATA;
}

size_t bc_xattr_list(const uint8_t *blob, size_t blob_len, int with_trusted, char *out,
                     size_t out_cap)
{
    size_t need = 0;
    for (int pass = 0; pass < 2; pass++) {   /* measure, then copy when it fits */
        size_t at = 0;
        for (size_t off = 0; blob != NULL && off < blob_len;) {
            struct rec r;
            if (rec_at(blob, blob_len, off, &r) < 0)
                break;
            off = r.next;
            if (!with_trusted && r.name_len >= 8 && memcmp(r.name, "trusted.", 8) == 0)
                continue;
            if (pass == 1) {
                memcpy(out + at, r.name, r.name_len);
                out[at + r.name_len] = '\0';
            }
            at += r.name_len + 1;
        }
        need = at;
        if (out == NULL || out_cap < need)
            break;
    }
    return need;
}
