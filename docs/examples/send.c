/* Send events to router over its Unix socket from C, and read one ack per line.
   Build: cc -O2 -o send send.c    Run: ./send [socket path] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "router-data/router.sock";
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror(path);
        return 2;
    }
    FILE *out = fdopen(dup(fd), "w"), *in = fdopen(fd, "r");
    int n = 100;
    for (int i = 0; i < n; i++) /* pipelined: write them all, then read the acks */
        fprintf(out, "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"Item Viewed\","
                     "\"messageId\":\"c-example-%d\",\"properties\":{\"item\":%d}}\n", i, i);
    fclose(out); /* flushes; the socket stays open for reading through `in` */

    char line[4096];
    int acked = 0, refused = 0;
    for (int i = 0; i < n && fgets(line, sizeof line, in); i++) {
        if (strncmp(line, "{\"ok\":true", 10) == 0)
            acked += atoi(strstr(line, "\"count\":") + 8);
        else {
            refused++;
            fprintf(stderr, "event %d refused: %s", i, line);
        }
    }
    fclose(in);
    printf("sent %d, acked %d, refused %d\n", n, acked, refused);
    return acked == n ? 0 : 1;
}
