/* bench-scp's durable DCMTK (see bench/scp/__init__.py): preloaded into storescp, it fsyncs
 * every regular file opened for writing just before the file is closed (close and fclose).
 * storescp closes an object's file before it sends the C-STORE response, so with this it
 * answers success only once the object is on the disk, as our SCP does; nothing else of
 * storescp changes. On journaled ext4 the file's fsync also commits its new directory entry.
 *
 *   cc -O2 -shared -fPIC -o fsync_on_close.so fsync_on_close.c -ldl
 *   LD_PRELOAD=$PWD/fsync_on_close.so storescp ...
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

static void sync_if_written(int fd)
{
    struct stat st;
    int flags = fcntl(fd, F_GETFL);

    if (flags >= 0 && (flags & O_ACCMODE) != O_RDONLY && fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
        fsync(fd);
}

int close(int fd)
{
    static int (*real_close)(int);

    if (!real_close)
        real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    sync_if_written(fd);
    return real_close(fd);
}

int fclose(FILE *f)
{
    static int (*real_fclose)(FILE *);

    if (!real_fclose)
        real_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    if (f) {
        fflush(f);
        sync_if_written(fileno(f));
    }
    return real_fclose(f);
}
