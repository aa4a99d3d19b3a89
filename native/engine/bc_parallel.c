/*
 * bc_parallel.c — a few helper threads that run parts of one large request's sector
 * work (the layers' encryption or decryption) beside the thread that serves it.
 *
 * Why: a sequential job at queue depth 1 (psync, a guest's single stream) hands the
 * engine one 1 MiB request at a time, so one thread does all its crypto while the other
 * cores wait; with two layers (double encryption) the crypto is most of a request's
 * time. bc_parallel_run(fn, args, n) runs fn(args[0]) in the caller and queues
 * args[1..n-1] for the helpers; a part no helper has taken by the time the caller is
 * done with its own is taken back and run by the caller, so a busy host (every helper
 * serving another request) costs nothing but a lock round trip, never a wait. For a
 * part a helper is running, the caller spins briefly before it sleeps (WAIT_SPIN_NS).
 *
 * Threads: min(online CPUs - 1, BC_PARALLEL_MAX), or BLOCKCRYPT_CRYPTO_THREADS
 * (0 turns this off), started on first use, detached, every signal blocked, alive for
 * the process. After fork() the child starts with no helper and a fresh queue (the
 * parent's threads do not exist there); it starts its own on its next use.
 *
 * What parts must be: independent (disjoint sector ranges of one request); fn must be
 * thread-safe with respect to the others (the layers are: FUSE threads already call
 * them concurrently). Keys never pass through here, only pointers to the request's
 * buffers, which outlive the call (the caller waits for every part).
 */
#define _GNU_SOURCE
#include "bc_engine.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define BC_PARALLEL_MAX 3u

/* How long the caller spins (yielding its CPU at each turn, in case the helper it waits
 * for is queued on it) for a part a helper is running, before it sleeps on the condition
 * variable. A wake from pthread_cond_wait took 15-20 us on a 2-vCPU VM; with the spin
 * the caller's wait at the end of a 1 MiB read fell from 27 to 10-13 us. The engine's
 * parts are about 128 KiB (bc_engine.c), so a running one ends well within this. */
#define WAIT_SPIN_NS 200000u

struct job {
    void (*fn)(void *);
    void *arg;
    int state;              /* 0 queued, 1 running on a helper, 2 done */
    struct job *next;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static struct job *head, *tail;
static unsigned helpers;     /* threads running */
static int started;          /* start() ran in this process (mu held) */
static int atfork_set;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *helper_main(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (head == NULL)
            pthread_cond_wait(&work_cv, &mu);
        struct job *j = head;
        head = j->next;
        if (head == NULL)
            tail = NULL;
        j->state = 1;
        pthread_mutex_unlock(&mu);
        j->fn(j->arg);
        pthread_mutex_lock(&mu);
        __atomic_store_n(&j->state, 2, __ATOMIC_RELEASE);   /* the caller may be spinning on it */
        pthread_cond_broadcast(&done_cv);
    }
    return NULL;
}

static void child_after_fork(void)
{
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&work_cv, NULL);
    pthread_cond_init(&done_cv, NULL);
    head = tail = NULL;
    helpers = 0;
    started = 0;
}

static unsigned wanted(void)
{
    const char *env = getenv("BLOCKCRYPT_CRYPTO_THREADS");
    if (env != NULL && *env) {
        char *end = NULL;
        unsigned long n = strtoul(env, &end, 10);
        if (end != NULL && *end == '\0')
            return n > BC_PARALLEL_MAX ? BC_PARALLEL_MAX : (unsigned)n;
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus <= 1)
        return 0;
    return (unsigned long)(cpus - 1) > BC_PARALLEL_MAX ? BC_PARALLEL_MAX : (unsigned)(cpus - 1);
}

/* mu held */
static void start(void)
{
    started = 1;
    if (!atfork_set)
        atfork_set = pthread_atfork(NULL, NULL, child_after_fork) == 0;
    unsigned n = wanted();
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* the helpers inherit "every signal blocked" */
    for (unsigned i = 0; i < n; i++) {
        pthread_attr_t a;
        pthread_t t;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&a, 256u << 10);
        if (pthread_create(&t, &a, helper_main, NULL) == 0)
            helpers++;
        pthread_attr_destroy(&a);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

unsigned bc_parallel_width(void)
{
    pthread_mutex_lock(&mu);
    if (!started)
        start();
    unsigned w = helpers + 1;
    pthread_mutex_unlock(&mu);
    return w;
}

void bc_parallel_run(void (*fn)(void *), void *const *args, size_t n)
{
    if (n == 0)
        return;
    struct job jobs[BC_PARALLEL_MAX];
    size_t q = n - 1 > BC_PARALLEL_MAX ? BC_PARALLEL_MAX : n - 1;
    pthread_mutex_lock(&mu);
    if (!started)
        start();
    if (helpers == 0)
        q = 0;
    for (size_t i = 0; i < q; i++) {
        jobs[i] = (struct job){.fn = fn, .arg = args[i + 1], .state = 0, .next = NULL};
        if (tail != NULL)
            tail->next = &jobs[i];
        else
            head = &jobs[i];
        tail = &jobs[i];
    }
    if (q > 0)
        pthread_cond_broadcast(&work_cv);
    pthread_mutex_unlock(&mu);

    fn(args[0]);
    for (size_t i = q + 1; i < n; i++)   /* more parts than helpers: the caller's */
        fn(args[i]);

    pthread_mutex_lock(&mu);
    for (size_t i = 0; i < q; i++) {
        struct job *j = &jobs[i];
        if (j->state == 0) {   /* not taken: unlink it and run it here */
            struct job **pp = &head, *prev = NULL;
            while (*pp != j) {
                prev = *pp;
                pp = &(*pp)->next;
            }
            *pp = j->next;
            if (tail == j)
                tail = prev;
            j->state = 1;
            pthread_mutex_unlock(&mu);
            fn(j->arg);
            pthread_mutex_lock(&mu);
            j->state = 2;
            continue;
        }
        if (j->state == 1) {   /* running: spin a little before sleeping (see WAIT_SPIN_NS) */
            pthread_mutex_unlock(&mu);
            uint64_t t0 = mono_ns();
            while (__atomic_load_n(&j->state, __ATOMIC_ACQUIRE) != 2 && mono_ns() - t0 < WAIT_SPIN_NS)
                sched_yield();
            pthread_mutex_lock(&mu);
        }
        while (j->state != 2)
            pthread_cond_wait(&done_cv, &mu);
    }
    pthread_mutex_unlock(&mu);
}
