/* Listeners on the configured address only, whatever a library asks for.
 *
 * Mooncake's transfer engine and master open listening sockets on every interface
 * (INADDR_ANY, or in6addr_any), and no setting of theirs changes it. Preloaded into
 * such a process with EPD_BIND_ONLY=<IPv4 address>, this bind() turns a bind to
 * "any" into a bind to that address (IPv6 sockets: its v4-mapped form), and leaves
 * every other bind alone. Built by `make` (and the Dockerfile); see ops/bind_guard.py.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *only = getenv("EPD_BIND_ONLY");
    struct in_addr v4;
    if (!only || !addr || inet_pton(AF_INET, only, &v4) != 1) return real_bind(fd, addr, len);
    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
            a.sin_addr = v4;
            return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
        }
    } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        if (memcmp(&a.sin6_addr, &in6addr_any, sizeof in6addr_any) == 0) {
            memset(&a.sin6_addr, 0, sizeof a.sin6_addr); /* ::ffff:<v4> */
            a.sin6_addr.s6_addr[10] = 0xff;
            a.sin6_addr.s6_addr[11] = 0xff;
            memcpy(&a.sin6_addr.s6_addr[12], &v4, 4);
            return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
        }
    }
    return real_bind(fd, addr, len);
}
