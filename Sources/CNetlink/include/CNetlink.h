// The part of libnl-3 / libnl-route-3 the mesh agent uses, loaded with dlopen on first use (mesh_nl_load),
// so that an agent that never opens the mesh interface maps and relocates none of it. Every mesh_X below
// calls libnl's X through a pointer resolved by dlsym; shim.c checks each pointer's type, and the constants
// below, against libnl's own headers. Call mesh_nl_load() (and check it) before any other mesh_ function
// but mesh_nl_geterror and mesh_setns_net.
#ifndef MESH_CNETLINK_H
#define MESH_CNETLINK_H

#include <stddef.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_addr.h>

struct nl_sock;
struct nl_addr;
struct nl_msg;
struct nl_cache;
struct nl_object;
struct rtnl_link;
struct rtnl_addr;

/// Loads libnl-route-3 (and with it libnl-3) once; 0 when every function below resolved, -1 otherwise
/// (mesh_nl_load_error says why). Thread-safe.
int mesh_nl_load(void);
/// dlerror()'s text (or which symbol is missing) when mesh_nl_load failed; NULL otherwise.
const char *mesh_nl_load_error(void);

// libnl error codes (positive; libnl returns them negated) and callback constants used by the agent.
#define MESH_NLE_FAILURE 1
#define MESH_NLE_AGAIN 4
#define MESH_NLE_NOMEM 5
#define MESH_NLE_EXIST 6
#define MESH_NLE_OPNOTSUPP 10
#define MESH_NLE_OBJ_NOTFOUND 12
#define MESH_NLE_NOADDR 19
#define MESH_NLE_NOACCESS 27
#define MESH_NLE_PERM 28
#define MESH_NLE_NODEV 31
#define MESH_NL_OK 0
#define MESH_NL_CB_VALID 0
#define MESH_NL_CB_CUSTOM 3

typedef int (*mesh_nl_recvmsg_msg_cb_t)(struct nl_msg *msg, void *arg);

/// libnl's message for a (positive or negative) error code; NULL when libnl is not loaded.
const char *mesh_nl_geterror(int error);

struct nl_sock *mesh_nl_socket_alloc(void);
void mesh_nl_socket_free(struct nl_sock *sk);
int mesh_nl_connect(struct nl_sock *sk, int protocol);
int mesh_nl_socket_get_fd(const struct nl_sock *sk);
void mesh_nl_socket_disable_seq_check(struct nl_sock *sk);
int mesh_nl_socket_add_membership(struct nl_sock *sk, int group);
int mesh_nl_socket_set_nonblocking(const struct nl_sock *sk);
int mesh_nl_socket_modify_cb(struct nl_sock *sk, int type, int kind, mesh_nl_recvmsg_msg_cb_t func, void *arg);
int mesh_nl_recvmsgs_default(struct nl_sock *sk);

struct nl_addr *mesh_nl_addr_build(int family, const void *buf, size_t size);
void mesh_nl_addr_put(struct nl_addr *addr);
void mesh_nl_addr_set_prefixlen(struct nl_addr *addr, int prefixlen);
int mesh_nl_addr_get_family(const struct nl_addr *addr);
void *mesh_nl_addr_get_binary_addr(const struct nl_addr *addr);
unsigned int mesh_nl_addr_get_len(const struct nl_addr *addr);

void mesh_nl_cache_free(struct nl_cache *cache);
struct nl_object *mesh_nl_cache_get_first(struct nl_cache *cache);
struct nl_object *mesh_nl_cache_get_next(struct nl_object *object);

struct nlmsghdr *mesh_nlmsg_hdr(struct nl_msg *msg);
void *mesh_nlmsg_data(const struct nlmsghdr *header);
struct nlattr *mesh_nlmsg_find_attr(struct nlmsghdr *header, int headerLength, int attribute);
void *mesh_nla_data(const struct nlattr *attribute);
int mesh_nla_len(const struct nlattr *attribute);

struct rtnl_link *mesh_rtnl_link_alloc(void);
void mesh_rtnl_link_put(struct rtnl_link *link);
int mesh_rtnl_link_get_kernel(struct nl_sock *sk, int ifindex, const char *name, struct rtnl_link **result);
int mesh_rtnl_link_add(struct nl_sock *sk, struct rtnl_link *link, int flags);
int mesh_rtnl_link_change(struct nl_sock *sk, struct rtnl_link *orig, struct rtnl_link *changes, int flags);
int mesh_rtnl_link_delete(struct nl_sock *sk, const struct rtnl_link *link);
void mesh_rtnl_link_set_name(struct rtnl_link *link, const char *name);
int mesh_rtnl_link_set_type(struct rtnl_link *link, const char *type);
char *mesh_rtnl_link_get_type(struct rtnl_link *link);
void mesh_rtnl_link_set_flags(struct rtnl_link *link, unsigned int flags);
unsigned int mesh_rtnl_link_get_flags(struct rtnl_link *link);
int mesh_rtnl_link_get_ifindex(struct rtnl_link *link);

/// rtnl_addr_* take a `struct rtnl_addr *`; the address cache's objects (struct nl_object *) are those.
struct rtnl_addr *mesh_rtnl_addr_alloc(void);
void mesh_rtnl_addr_put(struct rtnl_addr *addr);
int mesh_rtnl_addr_alloc_cache(struct nl_sock *sk, struct nl_cache **result);
int mesh_rtnl_addr_add(struct nl_sock *sk, struct rtnl_addr *addr, int flags);
int mesh_rtnl_addr_delete(struct nl_sock *sk, struct rtnl_addr *addr, int flags);
void mesh_rtnl_addr_set_ifindex(struct rtnl_addr *addr, int ifindex);
int mesh_rtnl_addr_get_ifindex(struct rtnl_addr *addr);
void mesh_rtnl_addr_set_prefixlen(struct rtnl_addr *addr, int prefixlen);
int mesh_rtnl_addr_get_prefixlen(struct rtnl_addr *addr);
void mesh_rtnl_addr_set_flags(struct rtnl_addr *addr, unsigned int flags);
int mesh_rtnl_addr_set_local(struct rtnl_addr *addr, struct nl_addr *local);
struct nl_addr *mesh_rtnl_addr_get_local(struct rtnl_addr *addr);

/// setns(fd, CLONE_NEWNET) for the calling thread, without needing _GNU_SOURCE in the importing module.
int mesh_setns_net(int fd);

#endif
