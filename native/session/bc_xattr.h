/*
 * bc_xattr.h — the extended attributes of one disk as the session serves them: a packed,
 * read-only blob pushed by the control plane with the disk's table entry (set_disk).
 *
 * Blob: records one after the other, nothing between them:
 *
 *   +-----------+------------+-------------------+----------------+
 *   | name_len  | value_len  | name              | value          |
 *   | u16 LE    | u32 LE     | name_len bytes    | value_len bytes|
 *   +-----------+------------+-------------------+----------------+
 *
 * Names are 1..255 bytes without NUL, unique in a blob; only the namespaces the control
 * plane stores ("user." and "trusted." with a non-empty rest) are valid. The control
 * plane owns every change (setxattr/removexattr go to it through a hook, which validates
 * sizes and pushes a new blob); this file only reads blobs. Pure functions, no locks.
 *
 * Caveat: the blob is trusted input from the control plane, but it is still checked
 * (bc_xattr_valid) before the session keeps it, so a bug there cannot overrun a buffer.
 */
#ifndef BC_XATTR_H
#define BC_XATTR_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define BC_XATTR_NAME_MAX 255
#define BC_XATTR_REC_HDR 6   /* u16 name_len + u32 value_len */

/* 0 when name may be stored (user.* or trusted.*, 1..255 bytes); -ERANGE when it is too long;
 * -EOPNOTSUPP for any other namespace (security.*, system.*, unknown prefixes). */
int bc_xattr_name_ok(const char *name);
/* 1 for a name in the trusted namespace ("trusted." prefix) (listed to privileged callers only). */
int bc_xattr_is_trusted(const char *name);
/* 0 for a well-formed blob (records in bounds, valid unique names), else -EINVAL. */
int bc_xattr_valid(const uint8_t *blob, size_t blob_len);
/* The value of name in the blob: 0 with value and value_len set, or -ENODATA. */
int bc_xattr_get(const uint8_t *blob, size_t blob_len, const char *name, const uint8_t **value,
                 size_t *value_len);
/* The NUL-terminated names (trusted.* only when with_trusted), as listxattr answers them:
 * returns the bytes they need; copies them into out when out_cap is at least that. */
size_t bc_xattr_list(const uint8_t *blob, size_t blob_len, int with_trusted, char *out,
                     size_t out_cap);

#endif
