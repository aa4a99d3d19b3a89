/*
 * test_session.c — the session's pure parts on their own: the xattr blob reader
 * (bc_xattr.c: bounds, namespaces, ENODATA, listing with and without trusted.*) and the
 * truncate rule (bc_session_truncate_plan). The FUSE paths are tested through a real
 * mount by tests/fuse (both front ends).
 */
#include "../bc_session.h"
#include "../bc_xattr.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;
#define CHECK(c)                                                                     \
    do {                                                                             \
        if (!(c)) {                                                                  \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #c);    \
            failures++;                                                              \
        }                                                                            \
    } while (0)

/* append one record to buf at *len */
static void rec(uint8_t *buf, size_t *len, const char *name, const void *value, size_t vlen)
{
    size_t n = strlen(name);
    uint8_t *p = buf + *len;
    p[0] = (uint8_t)n;
    p[1] = (uint8_t)(n >> 8);
    p[2] = (uint8_t)vlen;
    p[3] = (uint8_t)(vlen >> 8);
    p[4] = (uint8_t)(vlen >> 16);
    p[5] = (uint8_t)(vlen >> 24);
    memcpy(p + 6, name, n);
    memcpy(p + 6 + n, value, vlen);
    *len += 6 + n + vlen;
}

static void test_names(void)
{
    CHECK(bc_xattr_name_ok("user.x") == 0);
    CHECK(bc_xattr_name_ok("trusted.libvirt.security.dac") == 0);
    CHECK(bc_xattr_name_ok("user.") == -EOPNOTSUPP);
    CHECK(bc_xattr_name_ok("trusted.") == -EOPNOTSUPP);
    CHECK(bc_xattr_name_ok("security.capability") == -EOPNOTSUPP);
    CHECK(bc_xattr_name_ok("system.posix_acl_access") == -EOPNOTSUPP);
    CHECK(bc_xattr_name_ok("users.x") == -EOPNOTSUPP);
    CHECK(bc_xattr_name_ok("") == -EOPNOTSUPP);
    char longname[300];
    memset(longname, 'a', sizeof(longname));
    memcpy(longname, "user.", 5);
    longname[256] = '\0';   /* 256 bytes: one too many */
    CHECK(bc_xattr_name_ok(longname) == -ERANGE);
    longname[255] = '\0';
    CHECK(bc_xattr_name_ok(longname) == 0);
    CHECK(bc_xattr_is_trusted("trusted.a") && !bc_xattr_is_trusted("user.trusted.a"));
}

static void test_blob(void)
{
    uint8_t buf[1024];
    size_t len = 0;
    rec(buf, &len, "user.a", "1", 1);
    rec(buf, &len, "trusted.libvirt.security.dac", "+107:+107", 9);
    rec(buf, &len, "user.empty", "", 0);
    CHECK(bc_xattr_valid(buf, len) == 0);
    CHECK(bc_xattr_valid(NULL, 0) == 0);
    CHECK(bc_xattr_valid(NULL, 1) == -EINVAL);

    const uint8_t *v;
    size_t vlen;
    CHECK(bc_xattr_get(buf, len, "trusted.libvirt.security.dac", &v, &vlen) == 0 && vlen == 9 &&
          memcmp(v, "+107:+107", 9) == 0);
    CHECK(bc_xattr_get(buf, len, "user.empty", &v, &vlen) == 0 && vlen == 0);
    CHECK(bc_xattr_get(buf, len, "user.b", &v, &vlen) == -ENODATA);
    CHECK(bc_xattr_get(buf, len, "user.", &v, &vlen) == -ENODATA);   /* a prefix of user.a */
    CHECK(bc_xattr_get(NULL, 0, "user.a", &v, &vlen) == -ENODATA);

    char out[256];
    size_t need = bc_xattr_list(buf, len, 1, NULL, 0);
    CHECK(need == strlen("user.a") + 1 + strlen("trusted.libvirt.security.dac") + 1 +
                      strlen("user.empty") + 1);
    memset(out, 'X', sizeof(out));
    CHECK(bc_xattr_list(buf, len, 1, out, need) == need);
    CHECK(memcmp(out, "user.a\0trusted.libvirt.security.dac\0user.empty\0", need) == 0);
    CHECK(out[need] == 'X');   /* nothing past it */
    need = bc_xattr_list(buf, len, 0, NULL, 0);   /* an unprivileged caller */
    CHECK(need == strlen("user.a") + 1 + strlen("user.empty") + 1);
    memset(out, 'X', sizeof(out));
    CHECK(bc_xattr_list(buf, len, 0, out, sizeof(out)) == need);
    CHECK(memcmp(out, "user.a\0user.empty\0", need) == 0);
    memset(out, 'X', sizeof(out));
    CHECK(bc_xattr_list(buf, len, 1, out, 3) > 3 && out[0] == 'X');   /* too small: not copied */
    CHECK(bc_xattr_list(NULL, 0, 1, out, sizeof(out)) == 0);
}

static void test_bad_blobs(void)
{
    uint8_t buf[512];
    size_t len = 0;
    rec(buf, &len, "user.a", "1", 1);
    for (size_t cut = 1; cut < len; cut++)   /* every truncation is refused */
        CHECK(bc_xattr_valid(buf, cut) == -EINVAL);
    uint8_t bad[64];
    memcpy(bad, buf, len);
    bad[2] = 0xff;   /* value length past the end */
    CHECK(bc_xattr_valid(bad, len) == -EINVAL);
    const uint8_t *v;
    size_t vlen;
    CHECK(bc_xattr_get(bad, len, "user.a", &v, &vlen) == -ENODATA);   /* never read past it */
    CHECK(bc_xattr_list(bad, len, 1, NULL, 0) == 0);

    size_t n2 = 0;   /* a duplicate name */
    rec(bad, &n2, "user.a", "1", 1);
    rec(bad, &n2, "user.a", "2", 1);
    CHECK(bc_xattr_valid(bad, n2) == -EINVAL);
    n2 = 0;   /* a namespace the control plane never stores */
    rec(bad, &n2, "security.capability", "x", 1);
    CHECK(bc_xattr_valid(bad, n2) == -EINVAL);
    n2 = 0;   /* a NUL inside a name */
    rec(bad, &n2, "user.ab", "x", 1);
    bad[6 + 5] = '\0';
    CHECK(bc_xattr_valid(bad, n2) == -EINVAL);
    n2 = 0;   /* an empty name */
    bad[0] = bad[1] = 0;
    bad[2] = bad[3] = bad[4] = bad[5] = 0;
    CHECK(bc_xattr_valid(bad, 6) == -EINVAL);
}

static void test_truncate_plan(void)
{
    const uint64_t GiB = 1ull << 30;
    CHECK(bc_session_truncate_plan(GiB, GiB, 1) == BC_TRUNCATE_NOOP);
    CHECK(bc_session_truncate_plan(GiB, GiB, 0) == BC_TRUNCATE_NOOP);
    CHECK(bc_session_truncate_plan(GiB, 0, 1) == BC_TRUNCATE_WIPE);   /* qemu-img's first step */
    CHECK(bc_session_truncate_plan(GiB, 0, 0) == -EPERM);             /* truncate(2), O_TRUNC */
    CHECK(bc_session_truncate_plan(GiB, GiB / 2, 1) == -EPERM);
    CHECK(bc_session_truncate_plan(GiB, 2 * GiB, 1) == -EPERM);
    CHECK(bc_session_truncate_plan(0, 0, 1) == BC_TRUNCATE_NOOP);
}

int main(void)
{
    test_names();
    test_blob();
    test_bad_blobs();
    test_truncate_plan();
    if (failures) {
        fprintf(stderr, "test_session: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_session: ok\n");
    return 0;
}
