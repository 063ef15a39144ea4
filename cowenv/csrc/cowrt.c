/*
 * cowrt: run a cowenv schedule on the running Linux kernel.
 *
 * One source, two uses:
 *   - compiled with COWRT_PROGRAM defined (a string holding the schedule), it is the
 *     self-contained reproducer written by `cowenv export`: it runs the schedule, checks
 *     every `expect`, prints PASS/FAIL/XFAIL/SKIP lines and exits 0 (all passed) or 1;
 *   - compiled without it, it is the difftest executor (in the spirit of syz-executor):
 *     it reads schedules from stdin, one after another, and prints what it observed
 *     (every return value, and per-process smaps counters and pagemap bits).
 *
 * libc and raw system calls only (io_uring through syscall(2), no liburing).
 *
 * Model of execution. A coordinator process forks one worker process per simulated
 * process; each simulated thread is a real thread (pthreads) blocked on its own command
 * pipe. The coordinator sends one command at a time and waits for the reply, so the
 * schedule's order of operations across processes and threads is kept exactly. fork in a
 * worker makes a real child process that becomes the worker of the child's thread id.
 * Simulated addresses A are mapped at COWRT_BASE + A with MAP_FIXED; every region gets
 * MADV_NOHUGEPAGE (THP and mTHP off).
 *
 * Interleavings finer than a system call cannot be forced on a real kernel: operations
 * that the schedule interleaves inside each other ("race" groups) are sent to their
 * threads together, released at once through a shared flag, and the whole schedule is
 * run in a loop (syzkaller's threaded/collide mode): a race is tried, not replayed.
 *
 * Program text (one command per line):
 *   schedule NSLOTS ORIGIN STRIDE SLOT_PAGES OBSERVE REPEAT
 *   op i=IDX t=TID o=OP [a= l= p= s= u= w= f= v= n= nl= m= na= ma= ms= ty= ss=
 *                        pin= nt= tok= as= x=] [c=CHECK...]
 *   race N            (the next N op lines run concurrently)
 *   failnth N [t=TID] (/proc/thread-self/fail-nth of thread TID before its next op; without
 *                      t=, the next op's thread)
 *   end
 *
 * Issue 13's operations: mremap (a= l= nl= new length, m= MREMAP_MAYMOVE, na= new address
 * or -1), move_pages (a= l=, ma= MPOL_MF_MOVE_ALL, ms= nodes NULL, ss= the expected status
 * array: comma-separated values, u for "not written"), clear_refs (ty= the type written to
 * /proc/self/clear_refs), pagemap (a=: bits 55-63 of /proc/self/pagemap, >> 55), swapoff
 * (swapoff(2) of the first device of /proc/swaps, then swapon(2) with its priority: needs
 * root, skipped otherwise). A pid argument runs the op on a thread of that process.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/swap.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef COWRT_BASE
#define COWRT_BASE 0x100000000000ULL /* 16 TiB: far from the binary, heap, stacks */
#endif
#define PR_SET_COW_PTE 65 /* [PATCH v4 01/14] include/uapi/linux/prctl.h */
#define PR_GET_MDWE 66    /* upstream >= 6.3: 65 became PR_SET_MDWE */
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#define MADV_KEEPONFORK 19
#endif
#define PAGE 4096
#define MAXT 65
#define MAXPIN 256
#define MAXNAMES 256
#define MAXOPS 4096
#define MAXST 64               /* move_pages: pages per call */
#define ST_UNSET 0x7ffffffe    /* a status slot the kernel did not write */
#ifndef MPOL_MF_MOVE
#define MPOL_MF_MOVE (1 << 1)
#define MPOL_MF_MOVE_ALL (1 << 2)
#endif

enum { OP_MMAP = 1, OP_MUNMAP, OP_MPROTECT, OP_MADVISE, OP_READ, OP_WRITE, OP_FORK, OP_CLONE,
       OP_EXIT, OP_PRCTL, OP_PIN, OP_UNPIN, OP_DEVREAD, OP_DEVWRITE, OP_RECLAIM,
       OP_MREMAP, OP_MOVE_PAGES, OP_CLEAR_REFS, OP_PAGEMAP, OP_SWAPOFF, OP_LAST = OP_SWAPOFF };
static const char *op_names[] = {"", "mmap", "munmap", "mprotect", "madvise", "read", "write",
                                 "fork", "clone", "exit", "prctl_cow_pte", "pin", "unpin",
                                 "dev_read", "dev_write", "reclaim", "mremap", "move_pages",
                                 "clear_refs", "pagemap", "swapoff"};

struct cmd {
    int32_t op, nt, failnth, race, nst, pad;
    int64_t a, l, p, s, u, w, f, v, n, pin, tok, nl, m, na, ma, ms, ty;
    int32_t st[MAXST];
};
struct rep {
    int32_t tid, hello;
    int64_t ret, extra;
};

/* ------------------------------------------------------------------ worker side */
static int cmd_rd[MAXT], cmd_wr[MAXT], rep_rd[MAXT], rep_wr[MAXT];
static volatile int *go_flag; /* shared page: race release */
static int nthreads_proc;     /* live threads of this worker process */
static pthread_mutex_t proc_mu = PTHREAD_MUTEX_INITIALIZER;

struct pin {
    int used, write, kind; /* kind 1: vmsplice pipe, 2: io_uring fixed buffer */
    int pfd[2], tfd[2];    /* vmsplice pipe, tee scratch pipe */
    int ring, memfd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *sqe_ptr;
    size_t sq_sz, sqe_sz;
    uint64_t snap; /* value at pin time (vmsplice) */
};
static struct pin pins[MAXPIN];

static __thread sigjmp_buf acc_jb;
static __thread volatile int in_access;

static void segv_handler(int sig) {
    if (in_access) siglongjmp(acc_jb, 1);
    signal(sig, SIG_DFL);
    raise(sig);
}

static int readfull(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        got += r;
    }
    return 0;
}

static void writefull(int fd, const void *buf, size_t n) {
    size_t put = 0;
    while (put < n) {
        ssize_t r = write(fd, (const char *)buf + put, n - put);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) _exit(98);
        put += r;
    }
}

static void reply(int tid, int hello, int64_t ret, int64_t extra) {
    struct rep r = {tid, hello, ret, extra};
    writefull(rep_wr[tid], &r, sizeof r);
}

static int64_t guarded_load(uint64_t addr, int64_t *out) {
    in_access = 1;
    if (sigsetjmp(acc_jb, 1)) {
        in_access = 0;
        return -EFAULT;
    }
    *out = *(volatile int64_t *)(uintptr_t)addr;
    in_access = 0;
    return 0;
}

static int64_t guarded_store(uint64_t addr, int64_t v) {
    in_access = 1;
    if (sigsetjmp(acc_jb, 1)) {
        in_access = 0;
        return -EFAULT;
    }
    *(volatile int64_t *)(uintptr_t)addr = v;
    in_access = 0;
    return 0;
}

static int uring_setup(struct pin *p) {
    struct io_uring_params prm;
    memset(&prm, 0, sizeof prm);
    int fd = syscall(__NR_io_uring_setup, 4, &prm);
    if (fd < 0) return -errno;
    p->ring = fd;
    p->sq_sz = prm.sq_off.array + prm.sq_entries * sizeof(unsigned);
    size_t cq_sz = prm.cq_off.cqes + prm.cq_entries * sizeof(struct io_uring_cqe);
    if (cq_sz > p->sq_sz) p->sq_sz = cq_sz;
    p->sq_ptr = mmap(NULL, p->sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                     IORING_OFF_SQ_RING);
    if (p->sq_ptr == MAP_FAILED) { close(fd); return -ENOSYS; }
    p->sqe_sz = prm.sq_entries * sizeof(struct io_uring_sqe);
    p->sqe_ptr = mmap(NULL, p->sqe_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                      IORING_OFF_SQES);
    if (p->sqe_ptr == MAP_FAILED) { munmap(p->sq_ptr, p->sq_sz); close(fd); return -ENOSYS; }
    char *sq = p->sq_ptr;
    p->sq_tail = (unsigned *)(sq + prm.sq_off.tail);
    p->sq_mask = (unsigned *)(sq + prm.sq_off.ring_mask);
    p->sq_array = (unsigned *)(sq + prm.sq_off.array);
    p->cq_head = (unsigned *)(sq + prm.cq_off.head);
    p->cq_tail = (unsigned *)(sq + prm.cq_off.tail);
    p->cq_mask = (unsigned *)(sq + prm.cq_off.ring_mask);
    p->cqes = (struct io_uring_cqe *)(sq + prm.cq_off.cqes);
    p->sqes = p->sqe_ptr;
    return 0;
}

static int uring_rw(struct pin *p, int opcode, uint64_t addr) {
    unsigned tail = *p->sq_tail, idx = tail & *p->sq_mask;
    struct io_uring_sqe *e = &p->sqes[idx];
    memset(e, 0, sizeof *e);
    e->opcode = opcode;
    e->fd = p->memfd;
    e->addr = addr;
    e->len = 8;
    e->off = 0;
    e->buf_index = 0;
    p->sq_array[idx] = idx;
    __atomic_store_n(p->sq_tail, tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, p->ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0)
        return -errno;
    unsigned head = *p->cq_head;
    while (head == __atomic_load_n(p->cq_tail, __ATOMIC_ACQUIRE)) {
        if (syscall(__NR_io_uring_enter, p->ring, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0)
            return -errno;
    }
    int res = p->cqes[head & *p->cq_mask].res;
    __atomic_store_n(p->cq_head, head + 1, __ATOMIC_RELEASE);
    return res;
}

static void pin_release(struct pin *p, int owner) {
    if (!p->used) return;
    /* The owner unregisters first: closing the ring unpins later, from a workqueue. A
     * fork child shares the ring file and must only drop its descriptors. */
    if (p->kind == 2 && owner)
        syscall(__NR_io_uring_register, p->ring, IORING_UNREGISTER_BUFFERS, NULL, 0);
    if (p->kind == 1) {
        close(p->pfd[0]); close(p->pfd[1]); close(p->tfd[0]); close(p->tfd[1]);
    } else {
        munmap(p->sqe_ptr, p->sqe_sz);
        munmap(p->sq_ptr, p->sq_sz);
        close(p->ring);
        close(p->memfd);
    }
    p->used = 0;
}

static int64_t do_pin(int64_t id, uint64_t addr, int write) {
    if (id <= 0 || id >= MAXPIN) return -EINVAL;
    struct pin *p = &pins[id];
    memset(p, 0, sizeof *p);
    if (!write) { /* R/O: vmsplice, as cow.c's vmsplice tests */
        if (pipe(p->pfd)) return -errno;
        if (pipe(p->tfd)) { int e = errno; close(p->pfd[0]); close(p->pfd[1]); return -e; }
        struct iovec iov = {(void *)(uintptr_t)addr, PAGE};
        ssize_t r = vmsplice(p->pfd[1], &iov, 1, 0);
        if (r != PAGE) {
            int e = r < 0 ? errno : EFAULT;
            close(p->pfd[0]); close(p->pfd[1]); close(p->tfd[0]); close(p->tfd[1]);
            return -e;
        }
        int64_t v = 0;
        guarded_load(addr, &v);
        p->snap = v;
        p->kind = 1;
    } else { /* R/W long-term: io_uring fixed buffer (FOLL_WRITE|FOLL_PIN|FOLL_LONGTERM) */
        int r = uring_setup(p);
        if (r) return r;
        p->memfd = syscall(__NR_memfd_create, "cowrt", 0);
        if (p->memfd < 0 || ftruncate(p->memfd, PAGE)) {
            int e = errno;
            munmap(p->sqe_ptr, p->sqe_sz); munmap(p->sq_ptr, p->sq_sz); close(p->ring);
            return -e;
        }
        struct iovec iov = {(void *)(uintptr_t)addr, PAGE};
        if (syscall(__NR_io_uring_register, p->ring, IORING_REGISTER_BUFFERS, &iov, 1) < 0) {
            int e = errno;
            munmap(p->sqe_ptr, p->sqe_sz); munmap(p->sq_ptr, p->sq_sz);
            close(p->ring); close(p->memfd);
            return -e;
        }
        p->kind = 2;
    }
    p->used = 1;
    p->write = write;
    p->snap = p->kind == 1 ? p->snap : 0;
    (void)addr;
    return id;
}

static uint64_t pin_addr[MAXPIN];

static int64_t do_devread(int64_t id, int64_t *flag) {
    if (id <= 0 || id >= MAXPIN || !pins[id].used) return -EINVAL;
    struct pin *p = &pins[id];
    int64_t v = 0;
    if (p->kind == 1) {
        static __thread char buf[PAGE];
        ssize_t r = tee(p->pfd[0], p->tfd[1], PAGE, SPLICE_F_NONBLOCK);
        if (r != PAGE) return r < 0 ? -errno : -EIO;
        if (readfull(p->tfd[0], buf, PAGE)) return -EIO;
        memcpy(&v, buf, 8);
        *flag = (v == (int64_t)p->snap) ? 1 : 0;
        return v;
    }
    int r = uring_rw(p, IORING_OP_WRITE_FIXED, pin_addr[id]);
    if (r != 8) return r < 0 ? r : -EIO;
    if (pread(p->memfd, &v, 8, 0) != 8) return -EIO;
    return v;
}

static int64_t do_devwrite(int64_t id, int64_t tok) {
    if (id <= 0 || id >= MAXPIN || !pins[id].used) return -EINVAL;
    struct pin *p = &pins[id];
    if (!p->write) return -1; /* -EPERM: no writes through a R/O pin */
    if (pwrite(p->memfd, &tok, 8, 0) != 8) return -EIO;
    int r = uring_rw(p, IORING_OP_READ_FIXED, pin_addr[id]);
    if (r != 8) return r < 0 ? r : -EIO;
    return tok;
}

static int advice_of(int64_t v) {
    static const int adv[] = {MADV_DONTNEED, MADV_FREE, MADV_PAGEOUT, MADV_WIPEONFORK,
                              MADV_KEEPONFORK, MADV_DONTFORK, MADV_DOFORK};
    return adv[v];
}

static int64_t sysret(long r) { return r < 0 ? -errno : r; }

static void worker_loop(int tid);

static void *thread_main(void *arg) {
    int tid = (int)(intptr_t)arg;
    reply(tid, 1, syscall(SYS_gettid), 0);
    worker_loop(tid);
    return NULL;
}

static void failnth(int n) {
    char path[64], s[16];
    snprintf(path, sizeof path, "/proc/thread-self/fail-nth");
    int fd = open(path, O_WRONLY);
    if (fd < 0) return;
    int len = snprintf(s, sizeof s, "%d", n);
    if (write(fd, s, len) < 0) { /* reported by the coordinator */ }
    close(fd);
}

/* swapoff(2) of the first device of /proc/swaps, then swapon(2) with its priority. */
static int64_t do_swapoff(void) {
    FILE *f = fopen("/proc/swaps", "r");
    char ln[512], path[400] = "", type[32];
    long long size, used;
    int prio = -1, got = 0;
    if (!f) return -ENOENT;
    if (fgets(ln, sizeof ln, f) && fgets(ln, sizeof ln, f))
        got = sscanf(ln, "%399s %31s %lld %lld %d", path, type, &size, &used, &prio) == 5;
    fclose(f);
    if (!got) return -EINVAL;
    if (swapoff(path)) return -errno;
    int flags = prio >= 0 ? SWAP_FLAG_PREFER | (prio & SWAP_FLAG_PRIO_MASK) : 0;
    if (swapon(path, flags)) return -errno; /* reported: the device stays off */
    return 0;
}

static int64_t do_move_pages(uint64_t addr, struct cmd *c, int64_t *extra) {
    void *pages[MAXST];
    int nodes[MAXST], status[MAXST];
    int np = (int)(c->l / PAGE);
    if (np > MAXST) np = MAXST;
    for (int i = 0; i < np; i++) {
        pages[i] = (void *)(uintptr_t)(addr + (uint64_t)i * PAGE);
        nodes[i] = 0;
        status[i] = ST_UNSET;
    }
    long r = syscall(SYS_move_pages, 0, np, pages, c->ms ? NULL : nodes, status,
                     c->ma ? MPOL_MF_MOVE_ALL : MPOL_MF_MOVE);
    int64_t ret = r < 0 ? -errno : r;
    for (int i = 0; i < c->nst && i < np; i++)
        if (status[i] != c->st[i]) { /* first mismatch: index + 1, and the value seen */
            *extra = (int64_t)(i + 1) | (int64_t)(uint32_t)status[i] << 32;
            break;
        }
    return ret;
}

static void do_cmd(int tid, struct cmd *c) {
    uint64_t addr = COWRT_BASE + c->a;
    int64_t ret = 0, extra = 0;
    if (c->race) /* collide mode: wait for the release */
        while (__atomic_load_n(go_flag, __ATOMIC_ACQUIRE) != c->race) __builtin_ia32_pause();
    if (c->failnth) failnth(c->failnth);
    switch (c->op) {
    case OP_MMAP: {
        int prot = (c->p & 1 ? PROT_READ : 0) | (c->p & 2 ? PROT_WRITE : 0);
        void *m = mmap((void *)(uintptr_t)addr, c->l, prot,
                       MAP_FIXED | MAP_ANONYMOUS | (c->s ? MAP_SHARED : MAP_PRIVATE), -1, 0);
        if (m == MAP_FAILED) { ret = -errno; break; }
        madvise(m, c->l, MADV_NOHUGEPAGE);
        if (c->u) { /* MAP_POPULATE, after MADV_NOHUGEPAGE */
            char *q = m;
            for (int64_t o = 0; o < c->l && (c->p & 1 || c->p & 2); o += PAGE) {
                int64_t v;
                if (!c->s && (c->p & 2)) {
                    if (guarded_load((uint64_t)(uintptr_t)(q + o), &v) == 0)
                        guarded_store((uint64_t)(uintptr_t)(q + o), v);
                } else if (c->s && (c->p & 2)) {
                    if (guarded_load((uint64_t)(uintptr_t)(q + o), &v) == 0)
                        guarded_store((uint64_t)(uintptr_t)(q + o), v);
                } else {
                    guarded_load((uint64_t)(uintptr_t)(q + o), &v);
                }
            }
        }
        ret = c->a;
        break;
    }
    case OP_MUNMAP: ret = sysret(munmap((void *)(uintptr_t)addr, c->l)); break;
    case OP_MPROTECT:
        ret = sysret(mprotect((void *)(uintptr_t)addr, c->l,
                              (c->p & 1 ? PROT_READ : 0) | (c->p & 2 ? PROT_WRITE : 0)));
        break;
    case OP_MADVISE: ret = sysret(madvise((void *)(uintptr_t)addr, c->l, advice_of(c->v))); break;
    case OP_RECLAIM: ret = sysret(madvise((void *)(uintptr_t)(addr & ~(uint64_t)(PAGE - 1)), PAGE,
                                          MADV_PAGEOUT)); break;
    case OP_READ: {
        int64_t v = 0;
        ret = guarded_load(addr, &v);
        if (!ret) ret = v;
        break;
    }
    case OP_WRITE:
        ret = guarded_store(addr, c->tok);
        if (!ret) ret = c->tok;
        break;
    case OP_PRCTL:
        /* On upstream >= 6.3 option 65 is PR_SET_MDWE: do not issue it there. */
        ret = prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0 ? -EINVAL
                                                  : sysret(prctl(PR_SET_COW_PTE, 0, 0, 0, 0));
        break;
    case OP_PIN:
        pin_addr[c->pin > 0 && c->pin < MAXPIN ? c->pin : 0] = addr;
        ret = do_pin(c->pin, addr, (int)c->w);
        break;
    case OP_UNPIN:
        if (c->pin <= 0 || c->pin >= MAXPIN || !pins[c->pin].used) { ret = -EINVAL; break; }
        pin_release(&pins[c->pin], 1);
        ret = 0;
        break;
    case OP_MREMAP: {
        int fl = (c->m ? MREMAP_MAYMOVE : 0) | (c->na >= 0 ? MREMAP_FIXED : 0);
        void *r = mremap((void *)(uintptr_t)addr, c->l, c->nl, fl,
                         (void *)(uintptr_t)(c->na >= 0 ? COWRT_BASE + c->na : 0));
        ret = r == MAP_FAILED ? -errno : (int64_t)((uint64_t)(uintptr_t)r - COWRT_BASE);
        break;
    }
    case OP_MOVE_PAGES: ret = do_move_pages(addr, c, &extra); break;
    case OP_CLEAR_REFS: {
        char s[16];
        int fd = open("/proc/self/clear_refs", O_WRONLY), n = snprintf(s, sizeof s, "%lld",
                                                                       (long long)c->ty);
        if (fd < 0) { ret = -errno; break; }
        ret = write(fd, s, n) < 0 ? -errno : 0;
        close(fd);
        break;
    }
    case OP_PAGEMAP: {
        uint64_t ent = 0;
        int fd = open("/proc/self/pagemap", O_RDONLY);
        if (fd < 0) { ret = -errno; break; }
        ret = pread(fd, &ent, 8, (off_t)(addr / PAGE) * 8) == 8 ? (int64_t)(ent >> 55 & 0x1ff)
                                                                  : -errno;
        close(fd);
        break;
    }
    case OP_SWAPOFF: ret = do_swapoff(); break;
    case OP_DEVREAD: ret = do_devread(c->pin, &extra); break;
    case OP_DEVWRITE: ret = do_devwrite(c->pin, c->tok); break;
    case OP_CLONE: {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        pthread_mutex_lock(&proc_mu);
        nthreads_proc++;
        pthread_mutex_unlock(&proc_mu);
        if (pthread_create(&th, &at, thread_main, (void *)(intptr_t)c->nt)) {
            pthread_mutex_lock(&proc_mu);
            nthreads_proc--;
            pthread_mutex_unlock(&proc_mu);
            ret = -EAGAIN;
        } else {
            ret = c->nt;
        }
        break;
    }
    case OP_FORK: {
        pid_t pid = fork();
        if (pid == 0) {
            nthreads_proc = 1;
            pthread_mutex_init(&proc_mu, NULL);
            for (int i = 0; i < MAXPIN; i++) /* pins stay with the parent */
                pin_release(&pins[i], 0);
            reply((int)c->nt, 1, getpid(), 0);
            worker_loop((int)c->nt);
            _exit(0);
        }
        ret = pid < 0 ? -errno : pid;
        break;
    }
    case OP_EXIT: {
        pthread_mutex_lock(&proc_mu);
        int last = --nthreads_proc == 0;
        pthread_mutex_unlock(&proc_mu);
        reply(tid, 0, 0, last);
        if (last) syscall(SYS_exit_group, 0);
        syscall(SYS_exit, 0);
        for (;;) pause();
    }
    default: ret = -ENOSYS;
    }
    reply(tid, 0, ret, extra);
}

static void worker_loop(int tid) {
    for (;;) {
        struct cmd c;
        if (readfull(cmd_rd[tid], &c, sizeof c)) syscall(SYS_exit_group, 0);
        do_cmd(tid, &c);
    }
}

/* ------------------------------------------------------------------ coordinator side */
struct line {
    int kind; /* 1 op, 2 race, 3 failnth */
    int idx, tid, op, nt, race_n, failn, nst;
    int64_t a, l, p, s, u, w, f, v, n, nl, m, na, ma, ms, ty;
    int32_t st[MAXST];
    char pin[40], as[40], x[48], check[200];
    int has_a;
};
static struct line prog[MAXOPS];
static int nprog, nslots, slot_pages, observe, repeat;
static int64_t stride, origin;

static char *tok_val(char *t, const char *key) {
    size_t k = strlen(key);
    return strncmp(t, key, k) == 0 && t[k] == '=' ? t + k + 1 : NULL;
}

static int op_code(const char *s) {
    for (int i = 1; i <= OP_LAST; i++)
        if (!strcmp(op_names[i], s)) return i;
    return 0;
}

static int parse_program(const char *text) {
    char *buf = strdup(text), *save = NULL;
    nprog = 0;
    for (char *ln = strtok_r(buf, "\n", &save); ln; ln = strtok_r(NULL, "\n", &save)) {
        if (!*ln || *ln == '#') continue;
        if (!strncmp(ln, "schedule ", 9)) {
            long long st, org;
            if (sscanf(ln + 9, "%d %lli %lli %d %d %d", &nslots, &org, &st, &slot_pages,
                       &observe, &repeat) != 6)
                return -1;
            stride = st;
            origin = org;
            continue;
        }
        if (!strcmp(ln, "end")) break;
        if (nprog >= MAXOPS) return -1;
        struct line *L = &prog[nprog];
        memset(L, 0, sizeof *L);
        if (!strncmp(ln, "race ", 5)) { L->kind = 2; L->race_n = atoi(ln + 5); nprog++; continue; }
        if (!strncmp(ln, "failnth ", 8)) {
            char *t = strstr(ln, " t=");
            L->kind = 3;
            L->failn = atoi(ln + 8);
            L->tid = t ? atoi(t + 3) : 0;
            if (L->tid < 0 || L->tid >= MAXT) return -1;
            nprog++;
            continue;
        }
        if (strncmp(ln, "op ", 3)) return -1;
        L->kind = 1;
        char *c = strstr(ln, " c=");
        if (c) { snprintf(L->check, sizeof L->check, "%s", c + 3); *c = 0; }
        char *s2 = NULL;
        for (char *t = strtok_r(ln + 3, " ", &s2); t; t = strtok_r(NULL, " ", &s2)) {
            char *v;
            if ((v = tok_val(t, "i"))) L->idx = atoi(v);
            else if ((v = tok_val(t, "t"))) L->tid = atoi(v);
            else if ((v = tok_val(t, "o"))) L->op = op_code(v);
            else if ((v = tok_val(t, "a"))) { L->a = strtoll(v, 0, 0); L->has_a = 1; }
            else if ((v = tok_val(t, "l"))) L->l = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "p"))) L->p = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "s"))) L->s = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "u"))) L->u = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "w"))) L->w = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "f"))) L->f = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "v"))) L->v = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "n"))) L->n = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "nt"))) L->nt = atoi(v);
            else if ((v = tok_val(t, "nl"))) L->nl = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "m"))) L->m = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "na"))) L->na = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "ma"))) L->ma = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "ms"))) L->ms = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "ty"))) L->ty = strtoll(v, 0, 0);
            else if ((v = tok_val(t, "ss"))) {
                char *s3 = NULL;
                for (char *e = strtok_r(v, ",", &s3); e && L->nst < MAXST;
                     e = strtok_r(NULL, ",", &s3))
                    L->st[L->nst++] = *e == 'u' ? ST_UNSET : (int32_t)strtol(e, 0, 0);
            }
            else if ((v = tok_val(t, "pin"))) snprintf(L->pin, sizeof L->pin, "%s", v);
            else if ((v = tok_val(t, "as"))) snprintf(L->as, sizeof L->as, "%s", v);
            else if ((v = tok_val(t, "x"))) snprintf(L->x, sizeof L->x, "%s", v);
        }
        if (!L->op || L->tid < 0 || L->tid >= MAXT || L->nt < 0 || L->nt >= MAXT) return -1;
        nprog++;
    }
    free(buf);
    return 0;
}

/* named results of this run */
static char names[MAXNAMES][40];
static int64_t values[MAXNAMES];
static int nnames;

static int lookup(const char *n, int64_t *v) {
    for (int i = nnames - 1; i >= 0; i--)
        if (!strcmp(names[i], n)) { *v = values[i]; return 1; }
    return 0;
}

static void bind(const char *n, int64_t v) {
    if (nnames < MAXNAMES) { snprintf(names[nnames], 40, "%s", n); values[nnames++] = v; }
}

/* worker bookkeeping: tid -> process index; process index -> pid, pidfd, alive */
static int tid_proc[MAXT], tid_alive[MAXT], tid_ktid[MAXT];
static int proc_pid[MAXT * 4], proc_fd[MAXT * 4], proc_alive[MAXT * 4], nprocs;
static int64_t next_token, next_pin;
static int fails, passes, xfails, skips, out_of_sync;
static int exec_mode; /* 1: executor (print observations) */
static int have_failnth, have_swap;
static FILE *out;

static int wait_reply(int tid, struct rep *r) {
    struct pollfd pf = {rep_rd[tid], POLLIN, 0};
    int pr = poll(&pf, 1, 10000);
    if (pr <= 0) return -1;
    return readfull(rep_rd[tid], r, sizeof *r);
}

static void start_worker_process(void) {
    pid_t pid = fork();
    if (pid == 0) {
        for (int t = 0; t < MAXT; t++) { /* the coordinator's ends: EOF if it dies */
            close(cmd_wr[t]);
            close(rep_rd[t]);
        }
        nthreads_proc = 1;
        reply(1, 1, getpid(), 0);
        worker_loop(1);
        _exit(0);
    }
}

static void observe_all(int idx) {
    static char buf[1 << 20];
    for (int pi = 0; pi < nprocs; pi++) {
        if (!proc_alive[pi]) continue;
        char path[64];
        int64_t acc[64][4];
        memset(acc, 0, sizeof acc);
        /* through a live thread: an exited group leader has no mm to show */
        int kt = proc_pid[pi];
        for (int t = 1; t < MAXT; t++)
            if (tid_alive[t] && tid_proc[t] == pi) { kt = tid_ktid[t]; break; }
        snprintf(path, sizeof path, "/proc/%d/smaps", kt);
        int fd = open(path, O_RDONLY);
        size_t len = 0;
        if (fd >= 0) {
            ssize_t r;
            while ((r = read(fd, buf + len, sizeof buf - 1 - len)) > 0) len += r;
            close(fd);
        }
        buf[len] = 0;
        int cur = -1;
        for (char *ln = buf; ln && *ln;) {
            char *nl = strchr(ln, '\n');
            if (nl) *nl = 0;
            unsigned long long s, e;
            if (sscanf(ln, "%llx-%llx ", &s, &e) == 2 && strchr(ln, '-') < strchr(ln, ' ')) {
                cur = -1;
                uint64_t o = COWRT_BASE + origin;
                if (s >= o && s < o + (uint64_t)stride * nslots) {
                    cur = (int)((s - o) / stride);
                    if (cur >= 64) cur = -1;
                }
            } else if (cur >= 0) {
                long long kb;
                if (sscanf(ln, "Rss: %lld", &kb) == 1) acc[cur][0] += kb;
                else if (sscanf(ln, "Anonymous: %lld", &kb) == 1) acc[cur][1] += kb;
                else if (sscanf(ln, "Swap: %lld", &kb) == 1) acc[cur][2] += kb;
                else if (sscanf(ln, "LazyFree: %lld", &kb) == 1) acc[cur][3] += kb;
            }
            ln = nl ? nl + 1 : NULL;
        }
        snprintf(path, sizeof path, "/proc/%d/pagemap", kt);
        int pm = open(path, O_RDONLY);
        for (int sl = 0; sl < nslots && sl < 64; sl++) {
            fprintf(out, "s %d %d %d %lld %lld %lld %lld\n", idx, pi, sl, (long long)acc[sl][0],
                    (long long)acc[sl][1], (long long)acc[sl][2], (long long)acc[sl][3]);
            uint64_t ent[512];
            char digits[513];
            int np = slot_pages > 512 ? 512 : slot_pages;
            uint64_t va = COWRT_BASE + origin + (uint64_t)stride * sl;
            memset(ent, 0, sizeof ent);
            if (pm >= 0 && pread(pm, ent, np * 8, (va / PAGE) * 8) != np * 8) memset(ent, 0, sizeof ent);
            for (int k = 0; k < np; k++)
                digits[k] = '0' + (int)((ent[k] >> 63 & 1) | (ent[k] >> 62 & 1) << 1 |
                                        (ent[k] >> 56 & 1) << 2);
            digits[np] = 0;
            fprintf(out, "g %d %d %d %s\n", idx, pi, sl, digits);
        }
        if (pm >= 0) close(pm);
    }
}

static void send_cmd(struct line *L, int race, int fail_n) {
    struct cmd c;
    memset(&c, 0, sizeof c);
    c.op = L->op; c.nt = L->nt; c.race = race; c.failnth = fail_n;
    c.a = L->a; c.l = L->l; c.p = L->p; c.s = L->s; c.u = L->u; c.w = L->w; c.f = L->f;
    c.v = L->v; c.n = L->n; c.nl = L->nl; c.m = L->m; c.na = L->na; c.ma = L->ma;
    c.ms = L->ms; c.ty = L->ty; c.nst = L->nst;
    memcpy(c.st, L->st, sizeof c.st);
    if (L->pin[0]) {
        int64_t v;
        c.pin = lookup(L->pin, &v) ? v : strtoll(L->pin, 0, 0);
    }
    if (L->op == OP_PIN) c.pin = ++next_pin;
    if (L->op == OP_WRITE || L->op == OP_DEVWRITE) c.tok = next_token;
    writefull(cmd_wr[L->tid], &c, sizeof c);
}

static void check(struct line *L, int64_t ret, int64_t extra, int iter) {
    if (!L->x[0] || !strcmp(L->x, "skip")) return;
    int64_t want = 0;
    int ne = 0;
    if (!strncmp(L->x, "v:", 2)) want = strtoll(L->x + 2, 0, 0);
    else if (!strncmp(L->x, "eq:", 3) || !strncmp(L->x, "ne:", 3)) {
        ne = L->x[0] == 'n';
        if (!lookup(L->x + 3, &want)) {
            printf("SKIP step %d: %s: %s was not bound\n", L->idx, op_names[L->op], L->x + 3);
            skips++;
            return;
        }
    }
    int ok = ne ? ret != want : ret == want;
    const char *what = L->check[0] ? L->check : op_names[L->op];
    if ((L->op == OP_MOVE_PAGES && ret == -ENOSYS) || (L->op == OP_SWAPOFF && ret == -EPERM)) {
        if (iter == 0)
            printf("SKIP step %d: %s returned %lld: %s\n", L->idx, op_names[L->op],
                   (long long)ret, L->op == OP_SWAPOFF ? "needs CAP_SYS_ADMIN"
                                                       : "kernel without CONFIG_NUMA");
        skips++;
        return;
    }
    if (L->op == OP_PRCTL && ret < 0) {
        if (iter == 0)
                printf("SKIP step %d: prctl(PR_SET_COW_PTE) returned %lld: kernel without COW "
                   "PTE\n", L->idx, (long long)ret);
        skips++;
        return;
    }
    if (ok) {
        if (iter == 0) printf("PASS step %d: %s\n", L->idx, what);
        passes++;
    } else if (L->op == OP_DEVREAD && extra == 1) {
        printf("XFAIL step %d: %s: read %lld through a vmsplice reference, expected %s%lld: "
               "vmsplice is not a FOLL_LONGTERM R/O pin (no unshare; CONFIG_GUP_TEST's "
               "gup_test is)\n", L->idx, what, (long long)ret, ne ? "not " : "",
               (long long)want);
        xfails++;
    } else {
        printf("FAIL step %d: %s: %s returned %lld, expected %s%lld (iteration %d)\n", L->idx,
               what, op_names[L->op], (long long)ret, ne ? "not " : "", (long long)want, iter);
        fails++;
    }
}

/* after a reply: bookkeeping, binding, checks, observations */
static int finish(struct line *L, struct rep *r, int iter) {
    int64_t ret = r->ret;
    if (L->op == OP_FORK && ret > 0) {
        struct rep h;
        if (wait_reply(L->nt, &h) || !h.hello) return -1;
        tid_proc[L->nt] = nprocs;
        tid_alive[L->nt] = 1;
        tid_ktid[L->nt] = (int)h.ret;
        proc_pid[nprocs] = (int)h.ret;
        proc_fd[nprocs] = syscall(SYS_pidfd_open, (int)h.ret, 0);
        proc_alive[nprocs++] = 1;
    }
    if (L->op == OP_CLONE && ret > 0) {
        struct rep h;
        if (wait_reply(L->nt, &h) || !h.hello) return -1;
        tid_proc[L->nt] = tid_proc[L->tid];
        tid_alive[L->nt] = 1;
        tid_ktid[L->nt] = (int)h.ret;
    }
    if (L->op == OP_EXIT) {
        tid_alive[L->tid] = 0;
        if (r->extra) { /* last thread: wait until the mm is gone */
            int pi = tid_proc[L->tid];
            struct pollfd pf = {proc_fd[pi], POLLIN, 0};
            if (proc_fd[pi] >= 0) poll(&pf, 1, 10000);
            else usleep(20000);
            proc_alive[pi] = 0;
            if (proc_fd[pi] >= 0) close(proc_fd[pi]);
            proc_fd[pi] = -1;
        }
    }
    if ((L->op == OP_WRITE || L->op == OP_DEVWRITE) && ret == next_token) next_token++;
    if (L->as[0]) bind(L->as, ret);
    if (exec_mode) fprintf(out, "r %d %lld %lld\n", L->idx, (long long)ret, (long long)r->extra);
    else check(L, ret, r->extra, iter);
    if (!exec_mode && L->op == OP_MOVE_PAGES && L->nst && ret != -ENOSYS) {
        const char *what = L->check[0] ? L->check : op_names[L->op];
        if (!r->extra) {
            if (iter == 0) printf("PASS step %d: %s (status array)\n", L->idx, what);
            passes++;
        } else {
            int i = (int)(r->extra & 0xffffffff) - 1, seen = (int)(r->extra >> 32);
            char w[16], g[16];
            snprintf(w, sizeof w, L->st[i] == ST_UNSET ? "not written" : "%d", L->st[i]);
            snprintf(g, sizeof g, seen == ST_UNSET ? "not written" : "%d", seen);
            printf("FAIL step %d: %s: status[%d] is %s, expected %s (iteration %d)\n", L->idx,
                   what, i, g, w, iter);
            fails++;
        }
    }
    return 0;
}

static void kill_workers(void) {
    for (int pi = 0; pi < nprocs; pi++) {
        if (proc_alive[pi]) kill(proc_pid[pi], SIGKILL);
        if (proc_fd[pi] >= 0) {
            struct pollfd pf = {proc_fd[pi], POLLIN, 0};
            poll(&pf, 1, 5000);
            close(proc_fd[pi]);
        }
        proc_alive[pi] = 0;
        proc_fd[pi] = -1;
    }
    while (waitpid(-1, NULL, WNOHANG) > 0) {}
}

static int run_once(int iter) {
    nnames = 0; nprocs = 0; next_token = 1; next_pin = 0;
    memset(tid_alive, 0, sizeof tid_alive);
    *go_flag = 0;
    start_worker_process();
    struct rep h;
    if (wait_reply(1, &h) || !h.hello) return -1;
    proc_pid[0] = (int)h.ret;
    proc_fd[0] = syscall(SYS_pidfd_open, (int)h.ret, 0);
    proc_alive[0] = 1;
    nprocs = 1;
    tid_proc[1] = 0;
    tid_alive[1] = 1;
    tid_ktid[1] = (int)h.ret;
    int pending_fail = 0, race_id = 0;
    static int fail_of[MAXT]; /* failnth N t=TID: armed for TID's next op */
    memset(fail_of, 0, sizeof fail_of);
    for (int i = 0; i < nprog; i++) {
        struct line *L = &prog[i];
        if (L->kind == 3) {
            if (L->tid) fail_of[L->tid] = L->failn;
            else pending_fail = L->failn;
            continue;
        }
        if (L->kind == 1 && fail_of[L->tid] && !pending_fail) {
            pending_fail = fail_of[L->tid];
            fail_of[L->tid] = 0;
        }
        if (L->kind == 2) { /* race group: send all, release together, collect all */
            int n = L->race_n, first = i + 1;
            race_id++;
            for (int j = first; j < first + n && j < nprog; j++) {
                if (!tid_alive[prog[j].tid]) { out_of_sync = 1; return -1; }
                if (fail_of[prog[j].tid]) {
                    pending_fail = fail_of[prog[j].tid];
                    fail_of[prog[j].tid] = 0;
                }
                send_cmd(&prog[j], race_id, pending_fail);
                pending_fail = 0;
            }
            __atomic_store_n(go_flag, race_id, __ATOMIC_RELEASE);
            for (int j = first; j < first + n && j < nprog; j++) {
                struct rep r;
                if (wait_reply(prog[j].tid, &r)) { out_of_sync = 1; return -1; }
                if (finish(&prog[j], &r, iter)) return -1;
            }
            if (exec_mode && observe) observe_all(prog[first + n - 1].idx);
            i = first + n - 1;
            continue;
        }
        if (!tid_alive[L->tid]) {
            if (exec_mode) fprintf(out, "error step %d: thread %d is not alive\n", L->idx, L->tid);
            else printf("FAIL step %d: thread %d is not alive\n", L->idx, L->tid);
            fails++;
            return -1;
        }
        if (pending_fail && !have_failnth) {
            printf("SKIP fail_nth %d: /proc/thread-self/fail-nth absent "
                   "(kernel without CONFIG_FAULT_INJECTION)\n", pending_fail);
            skips++;
            pending_fail = 0;
        }
        if ((L->op == OP_RECLAIM || L->op == OP_SWAPOFF) && !have_swap) {
            if (!exec_mode) {
                printf("SKIP step %d: %s: no active swap%s\n", L->idx, op_names[L->op],
                       L->op == OP_RECLAIM ? ", anonymous pages cannot be reclaimed" : "");
                skips++;
            }
            continue;
        }
        send_cmd(L, 0, pending_fail);
        pending_fail = 0;
        struct rep r;
        if (wait_reply(L->tid, &r)) {
            if (exec_mode) fprintf(out, "error step %d: no reply from thread %d\n", L->idx, L->tid);
            else printf("FAIL step %d: no reply from thread %d\n", L->idx, L->tid);
            fails++;
            return -1;
        }
        if (finish(L, &r, iter)) return -1;
        if (exec_mode && observe) observe_all(L->idx);
    }
    return 0;
}

static void setup_pipes(void) {
    for (int t = 0; t < MAXT; t++) {
        int a[2], b[2];
        if (pipe2(a, O_CLOEXEC) || pipe2(b, O_CLOEXEC)) { perror("pipe"); exit(2); }
        cmd_rd[t] = a[0]; cmd_wr[t] = a[1]; rep_rd[t] = b[0]; rep_wr[t] = b[1];
    }
}

static void close_pipes(void) {
    for (int t = 0; t < MAXT; t++) {
        close(cmd_rd[t]); close(cmd_wr[t]); close(rep_rd[t]); close(rep_wr[t]);
    }
}

static void probe(int quiet) {
    have_failnth = access("/proc/thread-self/fail-nth", W_OK) == 0;
    FILE *f = fopen("/proc/swaps", "r");
    int lines = 0;
    char b[256];
    if (f) { while (fgets(b, sizeof b, f)) lines++; fclose(f); }
    have_swap = lines > 1;
    if (quiet) return;
    struct io_uring_params prm;
    memset(&prm, 0, sizeof prm);
    int fd = syscall(__NR_io_uring_setup, 1, &prm);
    printf("# io_uring: %s\n", fd >= 0 ? "available (R/W long-term pins: fixed buffers)"
                                       : "unavailable: R/W pins will fail");
    if (fd >= 0) close(fd);
    printf("# fail-nth: %s\n", have_failnth ? "available" : "absent (fault injection skipped)");
    printf("# swap: %s\n", have_swap ? "active" : "none (MADV_PAGEOUT cannot reclaim anon pages)");
    int mdwe = prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0;
    printf("# COW PTE: %s\n", mdwe ? "kernel without COW PTE (prctl option 65 is PR_SET_MDWE "
                                     "here, not issued)"
                                   : "prctl(PR_SET_COW_PTE=65) is tried at each prctl step");
}

static void init_common(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = segv_handler;
    sa.sa_flags = SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    go_flag = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
}

#ifdef COWRT_PROGRAM
int main(int argc, char **argv) {
    out = stdout;
    setvbuf(stdout, NULL, _IOLBF, 0);
    init_common();
    if (parse_program(COWRT_PROGRAM)) { printf("bad embedded program\n"); return 2; }
    if (argc > 1) repeat = atoi(argv[1]);
    if (repeat < 1) repeat = 1;
    probe(0);
    int race = 0;
    for (int i = 0; i < nprog; i++) race |= prog[i].kind == 2;
    if (race) printf("# collide mode: %d iterations of the schedule with racing threads\n", repeat);
    for (int it = 0; it < repeat; it++) {
        setup_pipes();
        int r = run_once(it);
        kill_workers();
        close_pipes();
        if (r && !fails) { printf("FAIL: run aborted (worker lost)\n"); fails++; }
        if (fails) break;
    }
    printf("%d passed, %d failed, %d xfail, %d skipped\n", passes, fails, xfails, skips);
    return fails ? 1 : 0;
}
#else
int main(void) {
    out = stdout;
    exec_mode = 1;
    init_common();
    probe(1);
    static char text[1 << 20];
    size_t len = 0;
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        size_t n = strlen(line);
        if (len + n + 1 >= sizeof text) len = 0;
        memcpy(text + len, line, n);
        len += n;
        text[len] = 0;
        if (!strcmp(line, "end\n") || !strcmp(line, "end")) {
            fails = 0;
            out_of_sync = 0;
            if (parse_program(text)) {
                fprintf(out, "error bad program\n");
            } else {
                setup_pipes();
                if (run_once(0)) fprintf(out, "error run aborted\n");
                kill_workers();
                close_pipes();
            }
            fprintf(out, "done\n");
            fflush(out);
            len = 0;
            text[0] = 0;
        }
    }
    return 0;
}
#endif
