// Built only with TOKCORE_GLIBC_COMPAT (cmake/GlibcCompat.cmake): the library is then
// linked against glibc 2.28 stub libraries and a static libstdc++, and gcc 12's
// libstdc++ (its headers and libstdc++.a, made for glibc 2.36) refers to three glibc
// symbols that glibc 2.28 does not have. Each gets a hidden definition here, so that
// nothing outside this library sees them and no newer glibc symbol version is needed.
// Linux x86-64 only (the only platform the option is turned on for).
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#define TOKCORE_COMPAT_HIDDEN __attribute__((visibility("hidden")))

extern "C" {

// glibc >= 2.32 sets this to 1 while the process has one thread, and libstdc++ then
// skips atomic operations (shared_ptr and locale reference counts). Zero means "maybe
// several threads": libstdc++ always uses the atomic path, which is always correct.
TOKCORE_COMPAT_HIDDEN char __libc_single_threaded = 0;

// glibc >= 2.33 exports fstat64; older glibc had it as an inline wrapper in
// libc_nonshared.a. On x86-64 struct stat64 is the kernel's struct stat, so the
// system call is the whole function (libstdc++'s filebuf::showmanyc uses it).
TOKCORE_COMPAT_HIDDEN int fstat64(int fd, struct stat64* buf) noexcept {
  return static_cast<int>(syscall(SYS_fstat, fd, buf));
}

// glibc >= 2.36 has arc4random, which std::random_device("default") uses; tokcore
// never constructs a random_device, but libstdc++.a's random.o comes in with the
// iostream objects. getrandom (glibc 2.25) blocks only until the kernel's pool is
// seeded, as arc4random does; any other failure ends the process, as in glibc.
TOKCORE_COMPAT_HIDDEN unsigned int arc4random(void) noexcept {
  unsigned int value = 0;
  for (;;) {
    const ssize_t n = getrandom(&value, sizeof(value), 0);
    if (n == static_cast<ssize_t>(sizeof(value))) return value;
    if (n < 0 && errno != EINTR) std::abort();
  }
}

}  // extern "C"
