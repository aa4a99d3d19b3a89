/*
 * blockcrypt._xts — bulk sector crypto over OpenSSL libcrypto.
 *
 * XtsContext(key: 64 bytes, sector_size: 512|4096, *, direct_iv=True,
 *            split_threshold=XTS_SPLIT_THRESHOLD_BYTES, split_spin_us=XTS_SPLIT_SPIN_US)
 *   .encrypt(data, sector_no) -> bytes   whole sectors, tweak = LE64(sector_no + i), upper
 *                                        8 tweak bytes zero (dm-crypt "plain64")
 *   .decrypt(data, sector_no) -> bytes   an all-zero ciphertext sector decrypts to zeros
 *                                        (holes in the backing file read as zeros)
 *   .wipe()                              forget the key; later calls raise ValueError
 *   .direct_iv                           which way tweaks are set (below)
 *
 * xts_raw(key, data, encrypt, *, tweak=None, sector_no=None, direct_iv=True) -> bytes
 *   one XTS data unit of any length >= 16 bytes with an explicit 16-byte tweak or a
 *   plain64 sector number, through the same per-unit routine as XtsContext. For
 *   known-answer tests only (it sets the key on every call and has no zero rule).
 *
 * The key is set once per context. Per sector only the tweak changes, in one of
 * two ways: the documented one, EVP_CipherInit_ex with only the IV (what
 * cryptsetup's OpenSSL backend does), or, when a self-test at key set-up proves it
 * equivalent, by writing the tweak straight into the cipher's IV buffer
 * (EVP_CIPHER_CTX_iv_noconst), which saves the EVP re-init, about 8 % of the time
 * of a 4096-byte sector. The GIL is released over the whole loop, so requests on
 * different sectors run in parallel. Internal helpers return 0/-errno; Python
 * exceptions are raised only at the boundary. Validation of lengths and sector
 * ranges happens here because it is cheap and protects memory; policy lives in
 * Python.
 *
 * Splitting (split_threshold > 0): a request of at least split_threshold bytes and 2+
 * sectors, when no other request is inside the sector loop in this process, is cut into
 * chunks that the calling thread and the context's helper pthread claim from a shared
 * counter, each with its own EVP contexts. The helper starts with the first split
 * request and is stopped and joined by wipe() and dealloc; it never touches Python.
 * Off by default: on the 2-vCPU build machine it did not pay at the FUSE level (see
 * docs/CRYPTO.md for the figures).
 *
 * Caveats: one context serves one thread at a time (the EVP context is stateful;
 * a per-context lock serialises callers and makes wipe() safe against a call in
 * flight); the Python side keeps a pool of contexts. A sector range that
 * would run past sector 2**64-1 is refused rather than wrapped. The direct IV
 * path relies on a deprecated OpenSSL 3 accessor returning the provider's IV
 * buffer; the self-test falls back to the documented path if that ever changes,
 * and the tests run every vector through both paths.
 */
#define PY_SSIZE_T_CLEAN
/* EVP_CIPHER_CTX_iv_noconst is deprecated in OpenSSL 3.0 but still exported; see xts_dir_open */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>

#define XTS_KEY_BYTES 64
#define XTS_TWEAK_BYTES 16
/* Requests of at least this many bytes (and 2+ sectors) are split in two halves: the
 * calling thread does the first, the context's helper thread the second, each with its
 * own EVP contexts. 0 disables. See docs/CRYPTO.md for the measurement behind it. */
#define XTS_SPLIT_THRESHOLD_BYTES 0
/* How long each side busy-waits for the other before sleeping on the condvar: the
 * helper for the next job after finishing one, the caller for the helper's half. */
#define XTS_SPLIT_SPIN_US 1000
/* the caller's busy-wait for the helper's last chunk before sleeping */
#define XTS_SPLIT_CALLER_SPIN_US 200
/* the unit of work the two threads claim from a split request */
#define XTS_SPLIT_CHUNK_BYTES (16 * 1024)

/* One direction of XTS with the key set once. iv_slot, when not NULL, is the IV
 * buffer inside the provider's cipher context: writing the tweak there replaces
 * the per-unit EVP_CipherInit_ex (which costs about 8 % at 4096-byte units). It is
 * used only after a self-test proved it equivalent (xts_dir_open). */
typedef struct {
    EVP_CIPHER_CTX *evp;
    unsigned char *iv_slot;
    int encrypt;
} xts_dir;

/* The helper thread of a context and its one job slot. The helper touches no Python
 * object and holds no GIL; it only reads `in` and writes `out` of the caller's buffers
 * while the caller waits for it, under the context's lock. */
enum { JOB_IDLE, JOB_POSTED, JOB_RUNNING, JOB_DONE, JOB_STOP };

typedef struct {
    pthread_t thread;
    pid_t owner_pid;   /* the helper exists in this process only (not after fork) */
    int running;
    pthread_mutex_t mu;
    pthread_cond_t cv;  /* state changed */
    atomic_int state;
    xts_dir enc;        /* the helper's own EVP contexts: never shared with the caller */
    xts_dir dec;
    /* the job, written by the caller before JOB_POSTED, read by the helper after it */
    int encrypt;
    const unsigned char *in;
    unsigned char *out;
    size_t sectors;
    size_t chunk_sectors;
    atomic_size_t next_chunk; /* the next chunk to claim, by either thread */
    uint64_t sector_no;
    uint32_t sector_size;
    int rc;                   /* the helper's result */
    unsigned spin_us;
} xts_helper;

typedef struct {
    PyObject_HEAD
    xts_dir enc;
    xts_dir dec;
    uint32_t sector_size;
    int initialised;
    PyThread_type_lock lock;
    Py_ssize_t split_threshold; /* bytes; 0 = never split */
    xts_helper helper;
} XtsContext;

/* calls inside the sector loop, process-wide: a request is split only when it is the
 * only one, since with other requests in flight the cores are busy anyway */
static atomic_int xts_calls_in_flight;

static int all_zero(const unsigned char *p, size_t n)
{
    /* Ciphertext is decided by its first 16 bytes (all zero with probability 2**-128),
     * so the common case costs two loads; only holes pay the full word-at-a-time scan.
     * Sectors are multiples of 512 bytes, so n % 512 == 0. */
    uint64_t head[2];
    memcpy(head, p, sizeof head); /* no alignment assumptions; compiles to loads */
    if (head[0] | head[1])
        return 0;
    uint64_t acc = 0;
    for (size_t off = 0; off < n; off += 512) {
        uint64_t w[64];
        memcpy(w, p + off, sizeof w);
        for (int i = 0; i < 64; i++)
            acc |= w[i];
        if (acc)
            return 0;
    }
    return 1;
}

/* dm-crypt plain64: the sector number, little-endian, zero-padded to 16 bytes. */
static void plain64_iv(unsigned char iv[XTS_TWEAK_BYTES], uint64_t sector_no)
{
    for (int b = 0; b < 8; b++)
        iv[b] = (unsigned char)(sector_no >> (8 * b));
    memset(iv + 8, 0, 8);
}

/* One XTS data unit with the key already set: set only the IV, then one update.
 * Returns 0 or -EIO. `src` and `dst` may be equal. */
static int xts_unit(const xts_dir *d, const unsigned char iv[XTS_TWEAK_BYTES],
                    const unsigned char *src, unsigned char *dst, int len)
{
    int outl = 0;
    if (d->iv_slot != NULL)
        memcpy(d->iv_slot, iv, XTS_TWEAK_BYTES);
    else if (EVP_CipherInit_ex(d->evp, NULL, NULL, NULL, iv, d->encrypt) != 1)
        return -EIO;
    if (EVP_CipherUpdate(d->evp, dst, &outl, src, len) != 1 || outl != len)
        return -EIO;
    return 0;
}

/* Whole sectors. Returns 0 or -EIO. `in` and `out` may alias exactly. */
static int xts_run(const xts_dir *d, const unsigned char *in, unsigned char *out,
                   size_t len, uint64_t sector_no, uint32_t sector_size)
{
    unsigned char iv[XTS_TWEAK_BYTES];
    size_t n = len / sector_size;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        const unsigned char *src = in + i * sector_size;
        unsigned char *dst = out + i * sector_size;
        if (!d->encrypt && all_zero(src, sector_size)) {
            memset(dst, 0, sector_size);
            continue;
        }
        plain64_iv(iv, sector_no + i);
        rc = xts_unit(d, iv, src, dst, (int)sector_size);
    }
    OPENSSL_cleanse(iv, sizeof iv);
    return rc;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Busy-wait up to spin_us for `state` to leave `from`; returns the state seen. With
 * `idle`, give up early as soon as any request is inside the sector loop without
 * having posted to us: the cores are busy with work that is not ours, and a spinning
 * helper would only take a CPU from it. */
static int spin_while(atomic_int *state, int from, unsigned spin_us, int idle)
{
    int st = atomic_load_explicit(state, memory_order_acquire);
    if (st != from || spin_us == 0)
        return st;
    uint64_t deadline = now_ns() + (uint64_t)spin_us * 1000u;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            cpu_relax();
            st = atomic_load_explicit(state, memory_order_acquire);
            if (st != from)
                return st;
        }
        if (now_ns() >= deadline)
            return st;
        if (idle && atomic_load_explicit(&xts_calls_in_flight, memory_order_relaxed) > 0) {
            /* maybe our own caller between counting itself and posting: look once more */
            for (int i = 0; i < 256; i++) {
                cpu_relax();
                if ((st = atomic_load_explicit(state, memory_order_acquire)) != from)
                    return st;
            }
            return st;
        }
        sched_yield(); /* let anything else runnable on this CPU go first (~0.5 µs) */
    }
}

static void helper_set_state(xts_helper *h, int st)
{
    pthread_mutex_lock(&h->mu);
    atomic_store_explicit(&h->state, st, memory_order_release);
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
}

/* Wait, spinning first, until the state is no longer `from`; returns the new state. */
static int helper_wait_while(xts_helper *h, int from, unsigned spin_us, int idle)
{
    int st = spin_while(&h->state, from, spin_us, idle);
    if (st != from)
        return st;
    pthread_mutex_lock(&h->mu);
    while ((st = atomic_load_explicit(&h->state, memory_order_acquire)) == from)
        pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
    return st;
}

/* Claim chunks of the posted job until none are left. Returns 0 or -EIO. */
static int split_work(xts_helper *h, const xts_dir *d)
{
    int rc = 0;
    for (;;) {
        size_t first = atomic_fetch_add_explicit(&h->next_chunk, 1, memory_order_relaxed) * h->chunk_sectors;
        if (first >= h->sectors)
            return rc;
        size_t count = h->sectors - first < h->chunk_sectors ? h->sectors - first : h->chunk_sectors;
        size_t off = first * h->sector_size;
        if (rc == 0)
            rc = xts_run(d, h->in + off, h->out + off, count * h->sector_size, h->sector_no + first,
                         h->sector_size);
    }
}

static void *helper_main(void *arg)
{
    xts_helper *h = arg;
    for (;;) {
        int st = helper_wait_while(h, JOB_IDLE, h->spin_us, 1);
        if (st == JOB_STOP)
            break;
        int posted = JOB_POSTED;
        if (st != JOB_POSTED ||
            !atomic_compare_exchange_strong_explicit(&h->state, &posted, JOB_RUNNING, memory_order_acq_rel,
                                                     memory_order_acquire)) {
            if (posted == JOB_STOP)
                break;
            /* the caller did the whole job itself and took it back: wait for the next */
            if (atomic_load_explicit(&h->state, memory_order_acquire) == JOB_IDLE)
                continue;
            helper_wait_while(h, atomic_load_explicit(&h->state, memory_order_acquire), h->spin_us, 0);
            continue;
        }
        h->rc = split_work(h, h->encrypt ? &h->enc : &h->dec);
        helper_set_state(h, JOB_DONE);
        /* wait for the caller to collect (JOB_IDLE) or to stop us */
        if (helper_wait_while(h, JOB_DONE, h->spin_us, 0) == JOB_STOP)
            break;
    }
    return NULL;
}

/* Start the helper thread if it is not running in this process. Called under the
 * context's lock. Returns 0 or -errno (the caller then runs unsplit). */
static int helper_start(xts_helper *h)
{
    pid_t pid = getpid();
    if (h->running && h->owner_pid == pid)
        return 0;
    /* never started, or started in a parent process before fork: in the child the
     * thread does not exist and the mutex may be in any state, so start afresh */
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    atomic_store(&h->state, JOB_IDLE);
    h->running = 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    int err = pthread_create(&h->thread, &attr, helper_main, h);
    pthread_attr_destroy(&attr);
    if (err != 0)
        return -err;
    h->running = 1;
    h->owner_pid = pid;
    return 0;
}

/* Stop and join the helper thread, if it runs in this process. Under the context's
 * lock (or in dealloc), so no split call is in flight. */
static void helper_stop(xts_helper *h)
{
    if (h->running && h->owner_pid == getpid()) {
        helper_set_state(h, JOB_STOP);
        pthread_join(h->thread, NULL);
        pthread_cond_destroy(&h->cv);
        pthread_mutex_destroy(&h->mu);
    }
    h->running = 0;
}

/* One request over both threads. The request is cut into chunks that the caller and
 * the helper claim from a shared counter, each with its own EVP context, so a helper
 * that wakes late (an idle vCPU can take tens of µs) costs nothing: the caller just
 * does more chunks. If the helper never picked the job up, the caller takes it back.
 * Under the context's lock. */
static int xts_run_split(xts_helper *h, int encrypt, const xts_dir *mine, const unsigned char *in,
                         unsigned char *out, size_t len, uint64_t sector_no, uint32_t sector_size)
{
    size_t sectors = len / sector_size;
    size_t chunk = XTS_SPLIT_CHUNK_BYTES / sector_size;
    if (chunk > sectors / 2)
        chunk = sectors / 2; /* at least two chunks, so small (test) requests split too */
    if (chunk == 0)
        chunk = 1;
    h->encrypt = encrypt;
    h->in = in;
    h->out = out;
    h->sectors = sectors;
    h->chunk_sectors = chunk;
    h->sector_no = sector_no; /* no overflow: the range was checked by the caller */
    h->sector_size = sector_size;
    h->rc = 0;
    atomic_store_explicit(&h->next_chunk, 0, memory_order_relaxed);
    helper_set_state(h, JOB_POSTED);
    int rc = split_work(h, mine);
    int posted = JOB_POSTED;
    if (atomic_compare_exchange_strong_explicit(&h->state, &posted, JOB_IDLE, memory_order_acq_rel,
                                                memory_order_acquire))
        return rc; /* the helper never started: it will find JOB_IDLE and go back to sleep */
    if (posted == JOB_RUNNING) /* the helper is inside its last chunk: microseconds */
        helper_wait_while(h, JOB_RUNNING, XTS_SPLIT_CALLER_SPIN_US, 0);
    int hrc = h->rc;
    helper_set_state(h, JOB_IDLE);
    return rc != 0 ? rc : hrc;
}

static void xts_dir_close(xts_dir *d)
{
    /* EVP_CIPHER_CTX_free cleanses the expanded key schedule */
    EVP_CIPHER_CTX_free(d->evp);
    d->evp = NULL;
    d->iv_slot = NULL;
}

/* Does writing the tweak into `slot` give exactly what EVP_CipherInit_ex with the
 * IV gives? The documented path sets tweak A (and the slot must then hold A);
 * writing tweak B into the slot must then produce the documented output for B,
 * which differs from A's, so the slot is proven to be the IV the cipher reads.
 * Returns 1 if so. */
static int direct_iv_selftest(xts_dir *d, unsigned char *slot)
{
    unsigned char in[64], out_a[64], want_b[64], got_b[64];
    unsigned char iv_a[XTS_TWEAK_BYTES], iv_b[XTS_TWEAK_BYTES];
    for (size_t i = 0; i < sizeof in; i++)
        in[i] = (unsigned char)(i * 37 + 11);
    for (int b = 0; b < XTS_TWEAK_BYTES; b++) {
        iv_a[b] = (unsigned char)(b * 3 + 1);
        iv_b[b] = (unsigned char)(0xF0 - b);
    }
    xts_dir slow = {d->evp, NULL, d->encrypt}, fast = {d->evp, slot, d->encrypt};
    int ok = xts_unit(&slow, iv_a, in, out_a, (int)sizeof in) == 0 &&
             memcmp(slot, iv_a, XTS_TWEAK_BYTES) == 0 &&
             xts_unit(&fast, iv_b, in, got_b, (int)sizeof in) == 0 &&
             xts_unit(&slow, iv_b, in, want_b, (int)sizeof in) == 0 &&
             memcmp(got_b, want_b, sizeof got_b) == 0 &&
             memcmp(out_a, want_b, sizeof out_a) != 0;
    OPENSSL_cleanse(out_a, sizeof out_a);
    OPENSSL_cleanse(got_b, sizeof got_b);
    OPENSSL_cleanse(want_b, sizeof want_b);
    return ok;
}

/* Set the key for one direction. With allow_direct, find the provider's IV slot
 * and keep it only if the self-test passes; otherwise every unit re-inits the IV
 * through EVP_CipherInit_ex (what cryptsetup's OpenSSL backend does).
 * Returns 0, -ENOMEM or -EINVAL (OpenSSL refused the key). */
static int xts_dir_open(xts_dir *d, const unsigned char *key, int encrypt, int allow_direct)
{
    static const unsigned char zero_iv[XTS_TWEAK_BYTES];
    d->encrypt = encrypt;
    d->iv_slot = NULL;
    d->evp = EVP_CIPHER_CTX_new();
    if (d->evp == NULL)
        return -ENOMEM;
    if (EVP_CipherInit_ex(d->evp, EVP_aes_256_xts(), NULL, key, zero_iv, encrypt) != 1) {
        xts_dir_close(d);
        return -EINVAL;
    }
#ifndef OPENSSL_NO_DEPRECATED_3_0
    if (allow_direct) {
        unsigned char *slot = EVP_CIPHER_CTX_iv_noconst(d->evp);
        if (slot != NULL && direct_iv_selftest(d, slot))
            d->iv_slot = slot;
    }
#else
    (void)allow_direct;
#endif
    return 0;
}

/* Key checks shared by XtsContext and xts_raw. Returns 0 or sets ValueError. */
static int check_key(const Py_buffer *key)
{
    if (key->len != XTS_KEY_BYTES) {
        PyErr_Format(PyExc_ValueError, "XTS key must be %d bytes, got %zd", XTS_KEY_BYTES, key->len);
        return -1;
    }
    if (memcmp(key->buf, (const char *)key->buf + 32, 32) == 0) {
        /* OpenSSL refuses XTS keys with equal halves (FIPS); say it clearly */
        PyErr_SetString(PyExc_ValueError, "XTS key halves must differ");
        return -1;
    }
    return 0;
}

static void xts_free_ctx(XtsContext *self)
{
    helper_stop(&self->helper); /* first: it may hold pointers to its contexts */
    xts_dir_close(&self->helper.enc);
    xts_dir_close(&self->helper.dec);
    xts_dir_close(&self->enc);
    xts_dir_close(&self->dec);
    self->sector_size = 0;
}

static int XtsContext_init(XtsContext *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "sector_size", "direct_iv", "split_threshold", "split_spin_us", NULL};
    Py_buffer key;
    unsigned int sector_size = 4096;
    int direct_iv = 1;
    Py_ssize_t split_threshold = XTS_SPLIT_THRESHOLD_BYTES;
    int spin_us = XTS_SPLIT_SPIN_US;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|I$pni", kwlist, &key, &sector_size, &direct_iv,
                                     &split_threshold, &spin_us))
        return -1;
    int rc = -1;
    if (self->initialised) {
        /* re-keying a context another thread may be using is never what the caller wants */
        PyErr_SetString(PyExc_ValueError, "XtsContext is already initialised; make a new one");
        PyBuffer_Release(&key);
        return -1; /* leave the working context alone */
    }
    if (check_key(&key) != 0)
        goto out;
    if (sector_size != 512 && sector_size != 4096) {
        PyErr_SetString(PyExc_ValueError, "sector_size must be 512 or 4096");
        goto out;
    }
    if (split_threshold < 0) {
        PyErr_SetString(PyExc_ValueError, "split_threshold must be >= 0 (0: never split)");
        goto out;
    }
    if (spin_us < 0 || spin_us > 10000) {
        PyErr_SetString(PyExc_ValueError, "split_spin_us must be in 0..10000");
        goto out;
    }
    if (self->lock == NULL)
        self->lock = PyThread_allocate_lock();
    xts_free_ctx(self); /* a previous failed __init__ may have left contexts behind */
    if (self->lock == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    int err = xts_dir_open(&self->enc, key.buf, 1, direct_iv);
    if (err == 0)
        err = xts_dir_open(&self->dec, key.buf, 0, direct_iv);
    if (err == 0 && split_threshold > 0) {
        /* the helper's own contexts, on the same IV path as the caller's */
        err = xts_dir_open(&self->helper.enc, key.buf, 1, self->enc.iv_slot != NULL);
        if (err == 0)
            err = xts_dir_open(&self->helper.dec, key.buf, 0, self->dec.iv_slot != NULL);
        if (err == 0 && ((self->helper.enc.iv_slot == NULL) != (self->enc.iv_slot == NULL) ||
                         (self->helper.dec.iv_slot == NULL) != (self->dec.iv_slot == NULL)))
            err = -EIO; /* the self-test gave another answer the second time: never seen */
    }
    if (err == -ENOMEM) {
        PyErr_NoMemory();
        goto out;
    } else if (err != 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL refused the XTS key");
        goto out;
    }
    self->sector_size = sector_size;
    self->split_threshold = split_threshold;
    self->helper.spin_us = (unsigned)spin_us;
    self->initialised = 1;
    rc = 0;
out:
    if (rc != 0)
        xts_free_ctx(self);
    PyBuffer_Release(&key);
    return rc;
}

/* sector_no as an unsigned 64-bit number; ValueError outside 0..2**64-1. */
static int parse_sector_no(PyObject *obj, uint64_t *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "sector_no must be an int, not %.80s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "sector_no must be in 0..2**64-1");
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static PyObject *xts_call(XtsContext *self, PyObject *const *args, Py_ssize_t nargs, int encrypt)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly 2 arguments (data, sector_no)",
                     encrypt ? "encrypt" : "decrypt");
        return NULL;
    }
    uint64_t sector_no;
    if (parse_sector_no(args[1], &sector_no) != 0)
        return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) != 0)
        return NULL;
    PyObject *result = NULL;
    uint32_t sector_size = self->sector_size;
    if (sector_size == 0) {
        PyErr_SetString(PyExc_ValueError, "XtsContext is wiped or not initialised");
        goto out;
    }
    if (data.len % sector_size != 0) {
        PyErr_Format(PyExc_ValueError, "length %zd is not a multiple of the sector size %u",
                     data.len, sector_size);
        goto out;
    }
    uint64_t sectors = (uint64_t)data.len / sector_size;
    if (sectors > 0 && sector_no > UINT64_MAX - (sectors - 1)) {
        PyErr_SetString(PyExc_ValueError, "sector range runs past sector 2**64-1");
        goto out;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL)
        goto out;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    /* read the context under the lock: wipe() may have freed it meanwhile */
    const xts_dir *d = encrypt ? &self->enc : &self->dec;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    int alone = atomic_fetch_add(&xts_calls_in_flight, 1) == 0;
    if (d->evp == NULL)
        rc = -EBADF;
    else if (alone && sectors >= 2 && self->split_threshold > 0 && data.len >= self->split_threshold &&
             self->helper.enc.evp != NULL && helper_start(&self->helper) == 0)
        rc = xts_run_split(&self->helper, encrypt, d, data.buf, out, (size_t)data.len, sector_no,
                           sector_size);
    else
        rc = xts_run(d, data.buf, out, (size_t)data.len, sector_no, sector_size);
    atomic_fetch_sub(&xts_calls_in_flight, 1);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    if (rc == -EBADF) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "XtsContext is wiped or not initialised");
    } else if (rc != 0) {
        Py_CLEAR(result);
        errno = -rc;
        PyErr_SetString(PyExc_OSError, "OpenSSL XTS operation failed");
    }
out:
    PyBuffer_Release(&data);
    return result;
}

static PyObject *XtsContext_encrypt(XtsContext *self, PyObject *const *args, Py_ssize_t nargs)
{
    return xts_call(self, args, nargs, 1);
}

static PyObject *XtsContext_decrypt(XtsContext *self, PyObject *const *args, Py_ssize_t nargs)
{
    return xts_call(self, args, nargs, 0);
}

static PyObject *XtsContext_wipe(XtsContext *self, PyObject *Py_UNUSED(ignored))
{
    if (self->lock) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
        xts_free_ctx(self);
        PyThread_release_lock(self->lock);
    } else {
        xts_free_ctx(self);
    }
    Py_RETURN_NONE;
}

static void XtsContext_dealloc(XtsContext *self)
{
    xts_free_ctx(self);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *XtsContext_get_sector_size(XtsContext *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->sector_size);
}

static PyMethodDef XtsContext_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))XtsContext_encrypt, METH_FASTCALL,
     "encrypt(data, sector_no) -> bytes: AES-256-XTS plain64 over whole sectors"},
    {"decrypt", (PyCFunction)(void (*)(void))XtsContext_decrypt, METH_FASTCALL,
     "decrypt(data, sector_no) -> bytes: all-zero ciphertext sectors read as zeros"},
    {"wipe", (PyCFunction)XtsContext_wipe, METH_NOARGS, "forget the key schedule"},
    {NULL}
};

static PyObject *XtsContext_get_split_threshold(XtsContext *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->split_threshold);
}

static PyObject *XtsContext_get_split_helper_running(XtsContext *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->helper.running && self->helper.owner_pid == getpid());
}

static PyObject *XtsContext_get_direct_iv(XtsContext *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->enc.iv_slot != NULL && self->dec.iv_slot != NULL);
}

static PyGetSetDef XtsContext_getset[] = {
    {"sector_size", (getter)XtsContext_get_sector_size, NULL, "sector size in bytes (0 once wiped)", NULL},
    {"direct_iv", (getter)XtsContext_get_direct_iv, NULL,
     "True if tweaks are written straight into the cipher's IV (self-tested), False if "
     "every sector re-inits the IV through EVP_CipherInit_ex", NULL},
    {"split_threshold", (getter)XtsContext_get_split_threshold, NULL,
     "requests of at least this many bytes (2+ sectors, no other call in flight) are split "
     "over the calling thread and a helper thread; 0 = never", NULL},
    {"split_helper_running", (getter)XtsContext_get_split_helper_running, NULL,
     "True while the helper thread exists (started by the first split request, stopped by wipe)",
     NULL},
    {NULL}
};

static PyTypeObject XtsContextType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blockcrypt._xts.XtsContext",
    .tp_basicsize = sizeof(XtsContext),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)XtsContext_init,
    .tp_dealloc = (destructor)XtsContext_dealloc,
    .tp_methods = XtsContext_methods,
    .tp_getset = XtsContext_getset,
    .tp_doc = "AES-256-XTS (plain64 tweak) over whole sectors; key set once",
};

/* xts_raw(key, data, encrypt, tweak=None, sector_no=None): one data unit, for KATs. */
static PyObject *native_xts_raw(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    static char *kwlist[] = {"key", "data", "encrypt", "tweak", "sector_no", "direct_iv", NULL};
    Py_buffer key, data;
    int encrypt, direct_iv = 1;
    PyObject *tweak_obj = Py_None, *sector_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*p|$OOp", kwlist, &key, &data, &encrypt,
                                     &tweak_obj, &sector_obj, &direct_iv))
        return NULL;
    PyObject *result = NULL;
    xts_dir d = {NULL, NULL, encrypt};
    unsigned char iv[XTS_TWEAK_BYTES];
    if (check_key(&key) != 0)
        goto out;
    if ((tweak_obj == Py_None) == (sector_obj == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "give exactly one of tweak= or sector_no=");
        goto out;
    }
    if (tweak_obj != Py_None) {
        Py_buffer tw;
        if (PyObject_GetBuffer(tweak_obj, &tw, PyBUF_SIMPLE) != 0)
            goto out;
        int ok = tw.len == XTS_TWEAK_BYTES;
        if (ok)
            memcpy(iv, tw.buf, XTS_TWEAK_BYTES);
        PyBuffer_Release(&tw);
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "tweak must be %d bytes", XTS_TWEAK_BYTES);
            goto out;
        }
    } else {
        uint64_t sector_no;
        if (parse_sector_no(sector_obj, &sector_no) != 0)
            goto out;
        plain64_iv(iv, sector_no);
    }
    if (data.len < 16 || data.len > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "XTS data unit must be 16 bytes or longer");
        goto out;
    }
    int err = xts_dir_open(&d, key.buf, encrypt, direct_iv);
    if (err == -ENOMEM) {
        PyErr_NoMemory();
        goto out;
    } else if (err != 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL refused the XTS key");
        goto out;
    }
    if (direct_iv && d.iv_slot == NULL) {
        /* the caller asked to test the direct path; do not silently test the other one */
        PyErr_SetString(PyExc_RuntimeError, "the direct IV path is not available with this libcrypto");
        goto out;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL)
        goto out;
    if (xts_unit(&d, iv, data.buf, (unsigned char *)PyBytes_AS_STRING(result), (int)data.len) != 0) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_OSError, "OpenSSL XTS operation failed");
    }
out:
    OPENSSL_cleanse(iv, sizeof iv);
    xts_dir_close(&d);
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *native_openssl_version(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)self;
    return PyUnicode_FromString(OpenSSL_version(OPENSSL_VERSION));
}

static PyMethodDef module_methods[] = {
    {"openssl_version", native_openssl_version, METH_NOARGS, "the libcrypto version string"},
    {"xts_raw", (PyCFunction)(void (*)(void))native_xts_raw, METH_VARARGS | METH_KEYWORDS,
     "xts_raw(key, data, encrypt, *, tweak=None, sector_no=None, direct_iv=True) -> bytes: "
     "one XTS data unit through the sector loop's per-unit routine (known-answer tests only)"},
    {NULL}
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "blockcrypt._xts",
    .m_doc = "Bulk sector crypto for blockcrypt (OpenSSL libcrypto).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__xts(void)
{
    if (PyType_Ready(&XtsContextType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&XtsContextType);
    if (PyModule_AddObject(m, "XtsContext", (PyObject *)&XtsContextType) < 0) {
        Py_DECREF(&XtsContextType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "XTS_KEY_BYTES", XTS_KEY_BYTES);
    PyModule_AddIntConstant(m, "XTS_SPLIT_THRESHOLD_BYTES", XTS_SPLIT_THRESHOLD_BYTES);
    PyModule_AddIntConstant(m, "XTS_SPLIT_SPIN_US", XTS_SPLIT_SPIN_US);
    return m;
}
