/* epoll(7) and eventfd(2) for the TCP relay loops: Glibc does not export them to Swift. Headers only. */
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

/* accept4(2) is a GNU extension that Glibc's module does not export without _GNU_SOURCE. */
extern int accept4(int fd, struct sockaddr *address, socklen_t *length, int flags);

static inline int mesh_accept4(int fd, struct sockaddr *address, socklen_t *length, int flags) {
    return accept4(fd, address, length, flags);
}
