/* Throughput of the vector instructions the NF4 GEMV is built from, alone and in pairs, in core cycles.
 * Each line runs a block of independent instructions on registers (no memory) many times; a pair that takes
 * longer than its slower member alone shares a port with it. Cycles are calibrated with a chain of dependent
 * imul (3 cycles each), so turbo and the TSC's rate do not enter.
 *
 *   cc -O2 -mavx512f -mavx512bw docs/bench/probes/ports.c -o /tmp/ports && /tmp/ports
 */
#include <stdint.h>
#include <stdio.h>
#include <x86intrin.h>

#define N 10000000
#define CLOB "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", \
             "zmm11", "zmm12", "zmm13", "zmm14", "zmm15", "zmm16", "zmm17", "zmm18", "zmm19", "zmm20", "zmm21"

static double tsc_per_cycle(void) {
    uint64_t x = 1, y = 3, t0 = __rdtsc();
    for (long i = 0; i < 50000000; i++)
        __asm__ volatile("imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0" : "+r"(x) : "r"(y));
    return (double)(__rdtsc() - t0) / (50000000.0 * 4 * 3);
}

static double per_cycle;

#define RUN(name, n, body)                                                                             \
    do {                                                                                               \
        uint64_t t0 = __rdtsc();                                                                       \
        for (int i = 0; i < N; i++) __asm__ volatile(body ::: CLOB);                                   \
        printf("%-34s %6.2f cycles per block of %d\n", name, (double)(__rdtsc() - t0) / N / per_cycle, \
               n);                                                                                     \
    } while (0)

/* One instruction writing zmm<d> from zmm20, zmm21: no chain except an accumulator's own. */
#define vpermw(d) "vpermw %%zmm20, %%zmm21, %%zmm" #d "\n\t"
#define vpermb(d) "vpermb %%zmm20, %%zmm21, %%zmm" #d "\n\t"
#define vpshufb(d) "vpshufb %%zmm20, %%zmm21, %%zmm" #d "\n\t"
#define vpermd(d) "vpermd %%zmm20, %%zmm21, %%zmm" #d "\n\t"
#define vpdpwssd(d) "vpdpwssd %%zmm20, %%zmm21, %%zmm" #d "\n\t"
#define vpdpbusd(d) "vpdpbusd %%zmm20, %%zmm21, %%zmm" #d "\n\t"
#define vpsrlw(d) "vpsrlw $4, %%zmm20, %%zmm" #d "\n\t"
#define vpsrldq(d) "vpsrldq $1, %%zmm20, %%zmm" #d "\n\t"
#define X8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define X8B(M) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
/* Destinations 16..19 for lookups/shifts, so an accumulator chain (0..15) is never behind them. */
#define X8T(M) M(16) M(17) M(18) M(19) M(16) M(17) M(18) M(19)

/* An instruction alone (16 independent), and a pair of 8 + 8. */
#define ALONE(M) RUN(#M, 16, X8(M) X8B(M))
#define PAIR(A, B) RUN(#A " + " #B, 16, X8T(A) X8(B))

int main(void) {
    per_cycle = tsc_per_cycle();
    printf("TSC ticks per core cycle: %.3f\n", per_cycle);
    ALONE(vpermw); ALONE(vpermb); ALONE(vpdpwssd); ALONE(vpdpbusd); ALONE(vpsrlw);
    PAIR(vpermw, vpdpwssd); PAIR(vpermb, vpdpwssd); PAIR(vpshufb, vpdpwssd); PAIR(vpermd, vpdpwssd);
    PAIR(vpsrlw, vpdpwssd); PAIR(vpsrldq, vpdpwssd); PAIR(vpsrlw, vpermw); PAIR(vpsrlw, vpermb);
    /* The GEMV's work on two 64-byte loads: 4 lookups, 4 multiply-adds, 1 word and 2 byte shifts each. */
    RUN("GEMV mix: 4 vpermw 4 vpdpwssd 1+2 shifts", 22,
        vpermw(16) vpermw(17) vpermw(18) vpermw(19) vpdpwssd(0) vpdpwssd(1) vpdpwssd(2) vpdpwssd(3)
        vpsrlw(16) vpsrldq(17) vpsrldq(18) vpermw(16) vpermw(17) vpermw(18) vpermw(19) vpdpwssd(4)
        vpdpwssd(5) vpdpwssd(6) vpdpwssd(7) vpsrlw(16) vpsrldq(17) vpsrldq(18));
    /* The same with three word shifts (by 4, 8 and 12 bits): what the GEMV uses on AMD, where vpsrldq
     * competes with vpdpwssd for a port and vpsrlw does not. */
    RUN("GEMV mix: 4 vpermw 4 vpdpwssd 3 word shifts", 22,
        vpermw(16) vpermw(17) vpermw(18) vpermw(19) vpdpwssd(0) vpdpwssd(1) vpdpwssd(2) vpdpwssd(3)
        vpsrlw(16) vpsrlw(17) vpsrlw(18) vpermw(16) vpermw(17) vpermw(18) vpermw(19) vpdpwssd(4)
        vpdpwssd(5) vpdpwssd(6) vpdpwssd(7) vpsrlw(16) vpsrlw(17) vpsrlw(18));
    RUN("the same without the shifts", 16,
        vpermw(16) vpermw(17) vpermw(18) vpermw(19) vpdpwssd(0) vpdpwssd(1) vpdpwssd(2) vpdpwssd(3)
        vpermw(16) vpermw(17) vpermw(18) vpermw(19) vpdpwssd(4) vpdpwssd(5) vpdpwssd(6) vpdpwssd(7));
    /* The 8-bit GEMV's work on four 64-byte loads: per load 1 word shift, 2 vpermb and 2 vpdpbusd. */
    RUN("8-bit mix: 2 vpermb 2 vpdpbusd 1 shift", 20,
        vpsrlw(16) vpermb(17) vpermb(18) vpdpbusd(0) vpdpbusd(1) vpsrlw(19) vpermb(17) vpermb(18)
        vpdpbusd(2) vpdpbusd(3) vpsrlw(16) vpermb(17) vpermb(18) vpdpbusd(4) vpdpbusd(5) vpsrlw(19)
        vpermb(17) vpermb(18) vpdpbusd(6) vpdpbusd(7));
    return 0;
}
