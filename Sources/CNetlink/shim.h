#include <netlink/netlink.h>
#include <netlink/route/link.h>
#include <netlink/route/link/dummy.h>
#include <netlink/route/addr.h>
#include <netlink/addr.h>
#include <netlink/cache.h>
