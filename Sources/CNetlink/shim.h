#include <netlink/netlink.h>
#include <netlink/msg.h>
#include <netlink/attr.h>
#include <netlink/route/link.h>
#include <netlink/route/addr.h>
#include <netlink/addr.h>
#include <netlink/cache.h>
#include <linux/if_addr.h>
#include <unistd.h>
#include <sys/syscall.h>

/// setns(fd, CLONE_NEWNET) for the calling thread, without needing _GNU_SOURCE in the importing module.
static inline int mesh_setns_net(int fd) {
    return (int)syscall(SYS_setns, fd, 0x40000000 /* CLONE_NEWNET */);
}
