// libnl-3 / libnl-route-3 through dlopen (see include/CNetlink.h). The idle agent (loopback bind mode) never
// calls mesh_nl_load, so neither library is mapped: ~0.5 MB of resident pages and their relocation at every
// start (perf/README.md). Building needs no libnl headers: the ABI check compiles this file against them
// (-DMESH_CHECK_LIBNL_ABI with pkg-config's flags) and asserts every pointer type and constant.
#include "CNetlink.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef MESH_CHECK_LIBNL_ABI
// Only for the ABI check (Tests/MeshAgentTests/Interface/LibnlABITests.swift compiles this file with
// `pkg-config --cflags libnl-route-3.0`): the build itself needs no libnl headers.
#include <netlink/addr.h>
#include <netlink/attr.h>
#include <netlink/cache.h>
#include <netlink/errno.h>
#include <netlink/handlers.h>
#include <netlink/msg.h>
#include <netlink/netlink.h>
#include <netlink/route/addr.h>
#include <netlink/route/link.h>
#include <netlink/socket.h>
#endif

/// libnl's soname (stable since libnl 3.2, 2011); loading it loads libnl-3.so.200, its dependency.
#define MESH_LIBNL_ROUTE "libnl-route-3.so.200"

// Every function used, with a pointer of libnl's own type; those marked SAME also have a wrapper of exactly
// that type (the others take int for libnl's enums).
#define MESH_NL_FUNCTIONS(SAME, OTHER)                                                                     \
    SAME(nl_geterror)                                                                                      \
    SAME(nl_socket_alloc)                                                                                  \
    SAME(nl_socket_free)                                                                                   \
    SAME(nl_connect)                                                                                       \
    SAME(nl_socket_get_fd)                                                                                 \
    SAME(nl_socket_disable_seq_check)                                                                      \
    SAME(nl_socket_add_membership)                                                                         \
    SAME(nl_socket_set_nonblocking)                                                                        \
    OTHER(nl_socket_modify_cb)                                                                             \
    SAME(nl_recvmsgs_default)                                                                              \
    SAME(nl_addr_build)                                                                                    \
    SAME(nl_addr_put)                                                                                      \
    SAME(nl_addr_set_prefixlen)                                                                            \
    SAME(nl_addr_get_family)                                                                               \
    SAME(nl_addr_get_binary_addr)                                                                          \
    SAME(nl_addr_get_len)                                                                                  \
    SAME(nl_cache_free)                                                                                    \
    SAME(nl_cache_get_first)                                                                               \
    SAME(nl_cache_get_next)                                                                                \
    SAME(nlmsg_hdr)                                                                                        \
    SAME(nlmsg_data)                                                                                       \
    SAME(nlmsg_find_attr)                                                                                  \
    SAME(nla_data)                                                                                         \
    SAME(nla_len)                                                                                          \
    SAME(rtnl_link_alloc)                                                                                  \
    SAME(rtnl_link_put)                                                                                    \
    SAME(rtnl_link_get_kernel)                                                                             \
    SAME(rtnl_link_add)                                                                                    \
    SAME(rtnl_link_change)                                                                                 \
    SAME(rtnl_link_delete)                                                                                 \
    SAME(rtnl_link_set_name)                                                                               \
    SAME(rtnl_link_set_type)                                                                               \
    SAME(rtnl_link_get_type)                                                                               \
    SAME(rtnl_link_set_flags)                                                                              \
    SAME(rtnl_link_get_flags)                                                                              \
    SAME(rtnl_link_get_ifindex)                                                                            \
    SAME(rtnl_addr_alloc)                                                                                  \
    SAME(rtnl_addr_put)                                                                                    \
    SAME(rtnl_addr_alloc_cache)                                                                            \
    SAME(rtnl_addr_add)                                                                                    \
    SAME(rtnl_addr_delete)                                                                                 \
    SAME(rtnl_addr_set_ifindex)                                                                            \
    SAME(rtnl_addr_get_ifindex)                                                                            \
    SAME(rtnl_addr_set_prefixlen)                                                                          \
    SAME(rtnl_addr_get_prefixlen)                                                                          \
    SAME(rtnl_addr_set_flags)                                                                              \
    SAME(rtnl_addr_set_local)                                                                              \
    SAME(rtnl_addr_get_local)

// Each pointer has the type of its mesh_ wrapper: libnl's own type, but for the enums nl_socket_modify_cb
// takes, which are ints here (the same ABI).
#define MESH_POINTER(name) static __typeof__(&mesh_##name) p_##name;
MESH_NL_FUNCTIONS(MESH_POINTER, MESH_POINTER)

#ifdef MESH_CHECK_LIBNL_ABI
#define MESH_SAME_TYPE(name)                                                                               \
    _Static_assert(__builtin_types_compatible_p(__typeof__(&mesh_##name), __typeof__(&name)),              \
                   "mesh_" #name " must have libnl's type");
#define MESH_NO_CHECK(name)
MESH_NL_FUNCTIONS(MESH_SAME_TYPE, MESH_NO_CHECK)
_Static_assert(sizeof(enum nl_cb_type) == sizeof(int) && sizeof(enum nl_cb_kind) == sizeof(int), "enums are ints");
_Static_assert(MESH_NLE_FAILURE == NLE_FAILURE && MESH_NLE_AGAIN == NLE_AGAIN && MESH_NLE_NOMEM == NLE_NOMEM
                   && MESH_NLE_EXIST == NLE_EXIST && MESH_NLE_OPNOTSUPP == NLE_OPNOTSUPP
                   && MESH_NLE_OBJ_NOTFOUND == NLE_OBJ_NOTFOUND && MESH_NLE_NOADDR == NLE_NOADDR
                   && MESH_NLE_NOACCESS == NLE_NOACCESS && MESH_NLE_PERM == NLE_PERM && MESH_NLE_NODEV == NLE_NODEV,
               "libnl error codes");
_Static_assert(MESH_NL_OK == NL_OK && MESH_NL_CB_VALID == NL_CB_VALID && MESH_NL_CB_CUSTOM == NL_CB_CUSTOM,
               "libnl callback constants");
_Static_assert(__builtin_types_compatible_p(mesh_nl_recvmsg_msg_cb_t, nl_recvmsg_msg_cb_t), "callback type");
#endif

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static int load_status = -1;
static char load_error[512];

static void load(void) {
    void *library = dlopen(MESH_LIBNL_ROUTE, RTLD_NOW | RTLD_LOCAL);
    if (library == NULL) {
        const char *why = dlerror();
        snprintf(load_error, sizeof load_error, "%s", why != NULL ? why : "dlopen " MESH_LIBNL_ROUTE " failed");
        return;
    }
#define MESH_RESOLVE(name)                                                                                 \
    p_##name = (__typeof__(p_##name))dlsym(library, #name);                                                \
    if (p_##name == NULL) {                                                                                \
        snprintf(load_error, sizeof load_error, "%s: symbol %s not found", MESH_LIBNL_ROUTE, #name);       \
        return;                                                                                            \
    }
    MESH_NL_FUNCTIONS(MESH_RESOLVE, MESH_RESOLVE)
#undef MESH_RESOLVE
    load_status = 0;  // the library stays loaded for the life of the process
}

int mesh_nl_load(void) {
    pthread_once(&load_once, load);
    return load_status;
}

const char *mesh_nl_load_error(void) {
    pthread_once(&load_once, load);
    return load_status == 0 ? NULL : load_error;
}

const char *mesh_nl_geterror(int error) {
    // Only after a successful load (pthread_once orders the pointers' writes before this read).
    if (mesh_nl_load() != 0) return NULL;
    return p_nl_geterror(error);
}

struct nl_sock *mesh_nl_socket_alloc(void) { return p_nl_socket_alloc(); }
void mesh_nl_socket_free(struct nl_sock *sk) { p_nl_socket_free(sk); }
int mesh_nl_connect(struct nl_sock *sk, int protocol) { return p_nl_connect(sk, protocol); }
int mesh_nl_socket_get_fd(const struct nl_sock *sk) { return p_nl_socket_get_fd(sk); }
void mesh_nl_socket_disable_seq_check(struct nl_sock *sk) { p_nl_socket_disable_seq_check(sk); }
int mesh_nl_socket_add_membership(struct nl_sock *sk, int group) { return p_nl_socket_add_membership(sk, group); }
int mesh_nl_socket_set_nonblocking(const struct nl_sock *sk) { return p_nl_socket_set_nonblocking(sk); }
int mesh_nl_socket_modify_cb(struct nl_sock *sk, int type, int kind, mesh_nl_recvmsg_msg_cb_t func, void *arg) {
    return p_nl_socket_modify_cb(sk, type, kind, func, arg);
}
int mesh_nl_recvmsgs_default(struct nl_sock *sk) { return p_nl_recvmsgs_default(sk); }

struct nl_addr *mesh_nl_addr_build(int family, const void *buf, size_t size) {
    return p_nl_addr_build(family, buf, size);
}
void mesh_nl_addr_put(struct nl_addr *addr) { p_nl_addr_put(addr); }
void mesh_nl_addr_set_prefixlen(struct nl_addr *addr, int prefixlen) { p_nl_addr_set_prefixlen(addr, prefixlen); }
int mesh_nl_addr_get_family(const struct nl_addr *addr) { return p_nl_addr_get_family(addr); }
void *mesh_nl_addr_get_binary_addr(const struct nl_addr *addr) { return p_nl_addr_get_binary_addr(addr); }
unsigned int mesh_nl_addr_get_len(const struct nl_addr *addr) { return p_nl_addr_get_len(addr); }

void mesh_nl_cache_free(struct nl_cache *cache) { p_nl_cache_free(cache); }
struct nl_object *mesh_nl_cache_get_first(struct nl_cache *cache) { return p_nl_cache_get_first(cache); }
struct nl_object *mesh_nl_cache_get_next(struct nl_object *object) { return p_nl_cache_get_next(object); }

struct nlmsghdr *mesh_nlmsg_hdr(struct nl_msg *msg) { return p_nlmsg_hdr(msg); }
void *mesh_nlmsg_data(const struct nlmsghdr *header) { return p_nlmsg_data(header); }
struct nlattr *mesh_nlmsg_find_attr(struct nlmsghdr *header, int headerLength, int attribute) {
    return p_nlmsg_find_attr(header, headerLength, attribute);
}
void *mesh_nla_data(const struct nlattr *attribute) { return p_nla_data(attribute); }
int mesh_nla_len(const struct nlattr *attribute) { return p_nla_len(attribute); }

struct rtnl_link *mesh_rtnl_link_alloc(void) { return p_rtnl_link_alloc(); }
void mesh_rtnl_link_put(struct rtnl_link *link) { p_rtnl_link_put(link); }
int mesh_rtnl_link_get_kernel(struct nl_sock *sk, int ifindex, const char *name, struct rtnl_link **result) {
    return p_rtnl_link_get_kernel(sk, ifindex, name, result);
}
int mesh_rtnl_link_add(struct nl_sock *sk, struct rtnl_link *link, int flags) {
    return p_rtnl_link_add(sk, link, flags);
}
int mesh_rtnl_link_change(struct nl_sock *sk, struct rtnl_link *orig, struct rtnl_link *changes, int flags) {
    return p_rtnl_link_change(sk, orig, changes, flags);
}
int mesh_rtnl_link_delete(struct nl_sock *sk, const struct rtnl_link *link) { return p_rtnl_link_delete(sk, link); }
void mesh_rtnl_link_set_name(struct rtnl_link *link, const char *name) { p_rtnl_link_set_name(link, name); }
int mesh_rtnl_link_set_type(struct rtnl_link *link, const char *type) { return p_rtnl_link_set_type(link, type); }
char *mesh_rtnl_link_get_type(struct rtnl_link *link) { return p_rtnl_link_get_type(link); }
void mesh_rtnl_link_set_flags(struct rtnl_link *link, unsigned int flags) { p_rtnl_link_set_flags(link, flags); }
unsigned int mesh_rtnl_link_get_flags(struct rtnl_link *link) { return p_rtnl_link_get_flags(link); }
int mesh_rtnl_link_get_ifindex(struct rtnl_link *link) { return p_rtnl_link_get_ifindex(link); }

struct rtnl_addr *mesh_rtnl_addr_alloc(void) { return p_rtnl_addr_alloc(); }
void mesh_rtnl_addr_put(struct rtnl_addr *addr) { p_rtnl_addr_put(addr); }
int mesh_rtnl_addr_alloc_cache(struct nl_sock *sk, struct nl_cache **result) {
    return p_rtnl_addr_alloc_cache(sk, result);
}
int mesh_rtnl_addr_add(struct nl_sock *sk, struct rtnl_addr *addr, int flags) {
    return p_rtnl_addr_add(sk, addr, flags);
}
int mesh_rtnl_addr_delete(struct nl_sock *sk, struct rtnl_addr *addr, int flags) {
    return p_rtnl_addr_delete(sk, addr, flags);
}
void mesh_rtnl_addr_set_ifindex(struct rtnl_addr *addr, int ifindex) { p_rtnl_addr_set_ifindex(addr, ifindex); }
int mesh_rtnl_addr_get_ifindex(struct rtnl_addr *addr) { return p_rtnl_addr_get_ifindex(addr); }
void mesh_rtnl_addr_set_prefixlen(struct rtnl_addr *addr, int prefixlen) {
    p_rtnl_addr_set_prefixlen(addr, prefixlen);
}
int mesh_rtnl_addr_get_prefixlen(struct rtnl_addr *addr) { return p_rtnl_addr_get_prefixlen(addr); }
void mesh_rtnl_addr_set_flags(struct rtnl_addr *addr, unsigned int flags) { p_rtnl_addr_set_flags(addr, flags); }
int mesh_rtnl_addr_set_local(struct rtnl_addr *addr, struct nl_addr *local) {
    return p_rtnl_addr_set_local(addr, local);
}
struct nl_addr *mesh_rtnl_addr_get_local(struct rtnl_addr *addr) { return p_rtnl_addr_get_local(addr); }

int mesh_setns_net(int fd) { return (int)syscall(SYS_setns, fd, 0x40000000 /* CLONE_NEWNET */); }
