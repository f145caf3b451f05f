/* Linux calls that Glibc's Swift module does not export (GNU extensions, epoll). Headers only: no library. */
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

/* GNU extensions, declared here because Glibc's module is built without _GNU_SOURCE. */
extern int accept4(int fd, struct sockaddr *address, socklen_t *length, int flags);
extern int pthread_setname_np(pthread_t thread, const char *name);

static inline int mesh_accept4(int fd, struct sockaddr *address, socklen_t *length, int flags) {
    return accept4(fd, address, length, flags);
}

/* Names the calling thread (15 bytes at most; longer names are cut), as ps -L and top -H show it. */
static inline void mesh_set_thread_name(const char *name) {
    char cut[16];
    int i = 0;
    for (; i < 15 && name[i] != 0; i++) cut[i] = name[i];
    cut[i] = 0;
    pthread_setname_np(pthread_self(), cut);
}

/* glibc's allocator: return freed memory to the system, and fix the mmap threshold. */
#include <malloc.h>

static inline int mesh_malloc_trim(void) { return malloc_trim(0); }

/* The heap's bytes in use and free (inside the heap, not given back), over every arena (mallinfo2). */
static inline void mesh_malloc_usage(unsigned long *used, unsigned long *free_bytes) {
    struct mallinfo2 m = mallinfo2();
    *used = (unsigned long)m.uordblks;
    *free_bytes = (unsigned long)m.fordblks;
}

/* Allocations of `bytes` and more get their own mapping, given back to the system when freed
   (glibc otherwise raises the threshold as large blocks are freed, and keeps them in its heap). */
static inline int mesh_set_mmap_threshold(int bytes) { return mallopt(M_MMAP_THRESHOLD, bytes); }

/* recvmmsg / sendmmsg (GNU extensions) for the DNS responder's UDP loop. `struct mesh_mmsghdr` has
   the layout of glibc's `struct mmsghdr`, which Glibc's module does not define. */
struct mmsghdr;
extern int recvmmsg(int fd, struct mmsghdr *vmessages, unsigned int vlen, int flags, struct timespec *tmo);
extern int sendmmsg(int fd, struct mmsghdr *vmessages, unsigned int vlen, int flags);

struct mesh_mmsghdr {
    struct msghdr msg_hdr;
    unsigned int msg_len;
};

/* MSG_WAITFORONE: block for the first datagram only, then take what is queued. */
static const int mesh_msg_waitforone = 0x10000;

static inline int mesh_recvmmsg(int fd, struct mesh_mmsghdr *messages, unsigned int count, int flags) {
    return recvmmsg(fd, (struct mmsghdr *)messages, count, flags, 0);
}

static inline int mesh_sendmmsg(int fd, struct mesh_mmsghdr *messages, unsigned int count, int flags) {
    return sendmmsg(fd, (struct mmsghdr *)messages, count, flags);
}

/* The CPUs the calling process may run on (sched_getaffinity(2): taskset, a cpuset), or -1. The raw
   system call with a 1,024-CPU mask: the glibc wrapper and CPU_COUNT need _GNU_SOURCE. */
#include <sys/syscall.h>
#include <unistd.h>

static inline int mesh_affinity_cpu_count(void) {
    unsigned long mask[1024 / (8 * sizeof(unsigned long))] = {0};
    long bytes = syscall(SYS_sched_getaffinity, 0, sizeof(mask), mask);
    if (bytes <= 0) return -1;
    int count = 0;
    for (unsigned i = 0; i < (unsigned long)bytes / sizeof(unsigned long); i++) count += __builtin_popcountl(mask[i]);
    return count;
}

/* posix_spawn: close every descriptor from `lowfd` up in the child (glibc 2.34+), so a child started by a
   threaded process inherits only its stdin, stdout and stderr, never a listener or a connection some other
   thread opened without O_CLOEXEC meanwhile. */
#include <spawn.h>
extern int posix_spawn_file_actions_addclosefrom_np(posix_spawn_file_actions_t *actions, int lowfd);

static inline int mesh_spawn_closefrom(posix_spawn_file_actions_t *actions, int lowfd) {
    return posix_spawn_file_actions_addclosefrom_np(actions, lowfd);
}
