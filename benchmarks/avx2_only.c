/* Preloaded by benchmarks/avx2_only.py: the process's CPUID answers without AVX-512.

   With CPUID faulting on (arch_prctl ARCH_SET_CPUID 0; the flag is per thread,
   inherited by new threads, reset by execve, where the preload sets it again),
   every CPUID instruction raises SIGSEGV. The handler below executes the real
   one with faulting briefly off, clears the feature bits of AVX-512, its
   BF16/FP16/VNNI extensions, AMX and AVX-VNNI, writes the registers back and
   steps over the instruction. Any other SIGSEGV goes to the handler the process
   installed: sigaction() and signal() for SIGSEGV are answered here so that a
   later handler (Python's faulthandler, which absl turns on) sits behind this
   one instead of replacing it. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static struct sigaction chained; /* the SIGSEGV handler the process believes it has */
static int active;

static int libc_sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
  static int (*real)(int, const struct sigaction *, struct sigaction *);
  if (!real) real = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
  return real(sig, act, old);
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
  if (sig != SIGSEGV || !active) return libc_sigaction(sig, act, old);
  struct sigaction was = chained;
  if (act) chained = *act;
  if (old) *old = was;
  return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
  struct sigaction act, old;
  memset(&act, 0, sizeof act);
  act.sa_handler = handler;
  act.sa_flags = SA_RESTART;
  sigemptyset(&act.sa_mask);
  if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
  return old.sa_handler;
}

static void masked_cpuid(unsigned leaf, unsigned subleaf, unsigned r[4]) {
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
  __cpuid_count(leaf, subleaf, r[0], r[1], r[2], r[3]);
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
  if (leaf == 7 && subleaf == 0) {
    /* EBX: AVX512 F, DQ, IFMA, PF, ER, CD, BW, VL */
    r[1] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
    /* ECX: AVX512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
    r[2] &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
    /* EDX: AVX512 4VNNIW, 4FMAPS, VP2INTERSECT, FP16; AMX BF16, TILE, INT8 */
    r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(23) | BIT(22) | BIT(24) | BIT(25));
  } else if (leaf == 7 && subleaf == 1) {
    r[0] &= ~(BIT(4) | BIT(5) | BIT(21)); /* EAX: AVX-VNNI, AVX512_BF16, AMX-FP16 */
  } else if (leaf == 0xd && subleaf == 0) {
    /* EAX, the state XSAVE supports: opmask, the ZMM halves and registers, AMX tiles */
    r[0] &= ~(BIT(5) | BIT(6) | BIT(7) | BIT(17) | BIT(18));
  }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
  greg_t *regs = ((ucontext_t *)context)->uc_mcontext.gregs;
  const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
  if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) { /* CPUID */
    unsigned r[4];
    masked_cpuid((unsigned)regs[REG_RAX], (unsigned)regs[REG_RCX], r);
    regs[REG_RAX] = r[0];
    regs[REG_RBX] = r[1];
    regs[REG_RCX] = r[2];
    regs[REG_RDX] = r[3];
    regs[REG_RIP] += 2;
    return;
  }
  if (chained.sa_flags & SA_SIGINFO) {
    chained.sa_sigaction(sig, info, context);
  } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
    chained.sa_handler(sig);
  } else {
    struct sigaction default_action;
    memset(&default_action, 0, sizeof default_action);
    default_action.sa_handler = SIG_DFL;
    libc_sigaction(SIGSEGV, &default_action, NULL);
    if (info->si_code <= 0) raise(sig); /* sent, not a fault that repeats on return */
  }
}

__attribute__((constructor)) static void hide_avx512(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = on_segv;
  action.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  if (libc_sigaction(SIGSEGV, &action, &chained) != 0 ||
      syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
    perror("avx2_only: CPUID faulting cannot be turned on");
    exit(1);
  }
  active = 1;
}
