/* LD_PRELOAD shim of the test node runner: a socket bound to the wildcard address 0.0.0.0
 * binds to the pod's own loopback address (KUBETUNE_POD_IP) instead.
 *
 * Pods run as host processes and share the host's network, so two pods serving the same
 * port on 0.0.0.0 would collide; in a cluster each pod has its own network namespace and
 * address. With this shim each pod listens on its own address (its status.podIP) and the
 * container's command, arguments and environment stay exactly as the builders made them. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    const char *ip = getenv("KUBETUNE_POD_IP");
    if (ip && addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        if (in->sin_addr.s_addr == htonl(INADDR_ANY)) {
            struct sockaddr_in mine = *in;
            if (inet_pton(AF_INET, ip, &mine.sin_addr) == 1)
                return real_bind(fd, (const struct sockaddr *)&mine, sizeof mine);
        }
    }
    return real_bind(fd, addr, len);
}
