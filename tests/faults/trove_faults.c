/*
 * Fault injection below the server, at the C library: loaded into the real
 * trove-server with LD_PRELOAD by tests/tests/filesystem_faults.rs.
 *
 * The file named by TROVE_FAULT_CONTROL holds one line, "OP ERRNO PATH",
 * read on every intercepted call: while it names OP (write, fsync, rename
 * or link), every such call on a file whose path contains PATH fails with
 * ERRNO and does nothing. An empty or missing file means no faults, so a
 * test arms and disarms faults by writing that file while the server runs.
 *
 *   write   write, writev, pwrite, pwrite64
 *   fsync   fsync, fdatasync
 *   rename  rename, renameat, renameat2 (either path)
 *   link    link, linkat (either path): how blobs are published
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int fault_for(const char *op, const char *path_a, const char *path_b, int *err) {
    const char *control = getenv("TROVE_FAULT_CONTROL");
    if (control == NULL) {
        return 0;
    }
    int fd = open(control, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return 0;
    }
    char line[1024];
    ssize_t n = read(fd, line, sizeof line - 1);
    close(fd);
    if (n <= 0) {
        return 0;
    }
    line[n] = '\0';
    char want[32];
    char fragment[960];
    int code = 0;
    if (sscanf(line, "%31s %d %959s", want, &code, fragment) != 3 || strcmp(want, op) != 0) {
        return 0;
    }
    if ((path_a != NULL && strstr(path_a, fragment) != NULL) ||
        (path_b != NULL && strstr(path_b, fragment) != NULL)) {
        *err = code;
        return 1;
    }
    return 0;
}

/* The path behind a descriptor, or NULL (sockets, pipes, errors). */
static const char *fd_path(int fd, char *out, size_t len) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, len - 1);
    if (n <= 0 || out[0] != '/') {
        return NULL;
    }
    out[n] = '\0';
    return out;
}

/* The C library's own `name`, looked up once. */
#define REAL(name) \
    static __typeof__(&name) real_##name = NULL; \
    if (real_##name == NULL) { \
        real_##name = (__typeof__(&name))dlsym(RTLD_NEXT, #name); \
    }

static int fd_fault(const char *op, int fd) {
    int err = 0;
    char path[4096];
    /* Standard streams (the server's logs) are never failed. */
    if (fd > 2 && fault_for(op, fd_path(fd, path, sizeof path), NULL, &err)) {
        errno = err;
        return 1;
    }
    return 0;
}

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    if (fd_fault("write", fd)) {
        return -1;
    }
    return real_write(fd, buf, count);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev);
    if (fd_fault("write", fd)) {
        return -1;
    }
    return real_writev(fd, iov, iovcnt);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite);
    if (fd_fault("write", fd)) {
        return -1;
    }
    return real_pwrite(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite64);
    if (fd_fault("write", fd)) {
        return -1;
    }
    return real_pwrite64(fd, buf, count, offset);
}

int fsync(int fd) {
    REAL(fsync);
    if (fd_fault("fsync", fd)) {
        return -1;
    }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    if (fd_fault("fsync", fd)) {
        return -1;
    }
    return real_fdatasync(fd);
}

int rename(const char *from, const char *to) {
    REAL(rename);
    int err = 0;
    if (fault_for("rename", from, to, &err)) {
        errno = err;
        return -1;
    }
    return real_rename(from, to);
}

int renameat(int from_dir, const char *from, int to_dir, const char *to) {
    REAL(renameat);
    int err = 0;
    if (fault_for("rename", from, to, &err)) {
        errno = err;
        return -1;
    }
    return real_renameat(from_dir, from, to_dir, to);
}

int renameat2(int from_dir, const char *from, int to_dir, const char *to, unsigned int flags) {
    REAL(renameat2);
    int err = 0;
    if (fault_for("rename", from, to, &err)) {
        errno = err;
        return -1;
    }
    return real_renameat2(from_dir, from, to_dir, to, flags);
}

int link(const char *from, const char *to) {
    REAL(link);
    int err = 0;
    if (fault_for("link", from, to, &err)) {
        errno = err;
        return -1;
    }
    return real_link(from, to);
}

int linkat(int from_dir, const char *from, int to_dir, const char *to, int flags) {
    REAL(linkat);
    int err = 0;
    if (fault_for("link", from, to, &err)) {
        errno = err;
        return -1;
    }
    return real_linkat(from_dir, from, to_dir, to, flags);
}
