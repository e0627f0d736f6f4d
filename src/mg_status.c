/* mg_status: the shared status page (see mg_status.h). */
#include "mg_status.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

mg_status_t *mg_status_create(const char *path) {
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return NULL;
  if (ftruncate(fd, sizeof(mg_status_t)) != 0) {
    int e = errno;
    close(fd);
    errno = e;
    return NULL;
  }
  void *p = mmap(NULL, sizeof(mg_status_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int e = errno;
  close(fd);
  if (p == MAP_FAILED) {
    errno = e;
    return NULL;
  }
  mg_status_t *s = p;
  memset(s, 0, sizeof *s);
  s->magic = MG_STATUS_MAGIC;
  return s;
}

const mg_status_t *mg_status_open(const char *path) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NULL;
  off_t size = lseek(fd, 0, SEEK_END);
  if (size < (off_t)sizeof(mg_status_t)) {
    close(fd);
    errno = EINVAL;
    return NULL;
  }
  void *p = mmap(NULL, sizeof(mg_status_t), PROT_READ, MAP_SHARED, fd, 0);
  int e = errno;
  close(fd);
  if (p == MAP_FAILED) {
    errno = e;
    return NULL;
  }
  const mg_status_t *s = p;
  if (s->magic != MG_STATUS_MAGIC) {
    munmap(p, sizeof(mg_status_t));
    errno = EINVAL;
    return NULL;
  }
  return s;
}

void mg_status_close(const mg_status_t *s) {
  if (s) munmap((void *)s, sizeof(mg_status_t));
}

void mg_status_path(const char *pid_file, char *buf, size_t len) {
  snprintf(buf, len, "%s.status", pid_file ? pid_file : MG_DEFAULT_PID_FILE);
}

void mg_status_files_path(const char *pid_file, char *buf, size_t len) {
  snprintf(buf, len, "%s.files", pid_file ? pid_file : MG_DEFAULT_PID_FILE);
}
