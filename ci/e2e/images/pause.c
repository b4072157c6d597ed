/* The pod sandbox's pause process for the e2e cluster (no registry can be
 * reached, so the real registry.k8s.io/pause image cannot be pulled).
 *
 * Like the real one: it sleeps until a signal comes, reaps the children it
 * inherits as PID 1 of a shared PID namespace, and exits 0 on SIGTERM or
 * SIGINT, so the runtime can stop a sandbox without waiting for SIGKILL.
 * Built with `gcc -static`: the image holds this one file and nothing else.
 */
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int signo) {
    (void)signo;
    _exit(0);
}

static void on_child(int signo) {
    (void)signo;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

static void handle(int signo, void (*handler)(int)) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    if (sigaction(signo, &action, NULL) != 0) {
        _exit(1);
    }
}

int main(void) {
    handle(SIGTERM, on_stop);
    handle(SIGINT, on_stop);
    handle(SIGCHLD, on_child);
    for (;;) {
        pause();
    }
}
