/* The few rates that decided the NF4 GEMV's and the bf16 GEMM's shape on Zen 5 (BENCHMARKS.md), in core
 * cycles calibrated by a chain of dependent imul (3 cycles each):
 *  - latency of vpdpwssd and vpermw (a chain through one register);
 *  - a 16-lane vgatherdps, one after another (the old block-scale lookup);
 *  - loads per cycle: 64-byte loads and 8-byte broadcasts from L1;
 *  - vdpbf16ps and vfmadd231ps issue rates (16 independent accumulators).
 *
 *   cc -O2 -mavx512f -mavx512bw -mavx512bf16 docs/bench/probes/zen5.c -o /tmp/zen5 && taskset -c 1 /tmp/zen5
 */
#include <stdint.h>
#include <stdio.h>
#include <x86intrin.h>

#define N 20000000L
static double per_cycle;

static double tsc_per_cycle(void) {
    uint64_t x = 1, y = 3, t0 = __rdtsc();
    for (long i = 0; i < 50000000; i++)
        __asm__ volatile("imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0" : "+r"(x) : "r"(y));
    return (double)(__rdtsc() - t0) / (50000000.0 * 12);
}

#define ACC "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", \
            "zmm11", "zmm12", "zmm13", "zmm14", "zmm15"
#define TIME(name, per, body)                                                                      \
    do {                                                                                           \
        uint64_t t0 = __rdtsc();                                                                   \
        for (long i = 0; i < N; i++) body;                                                         \
        printf("%-44s %6.2f cycles\n", name, (double)(__rdtsc() - t0) / N / per_cycle / (per)); \
    } while (0)
#define X4(s) s s s s
#define X16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
#define DPBF(d) "vdpbf16ps %%zmm20, %%zmm21, %%zmm" #d "\n\t"
#define FMA(d) "vfmadd231ps %%zmm20, %%zmm21, %%zmm" #d "\n\t"
#define LOAD(d) "vmovdqu64 " #d "*64(%0), %%zmm" #d "\n\t"
#define BCAST(d) "vbroadcastsd " #d "*8(%0), %%zmm" #d "\n\t"

int main(void) {
    static float map[256] __attribute__((aligned(64)));
    static char buf[16 * 64] __attribute__((aligned(64)));
    for (int i = 0; i < 256; i++) map[i] = (float)i;
    per_cycle = tsc_per_cycle();
    printf("TSC ticks per core cycle: %.3f\n", per_cycle);
    TIME("vpdpwssd latency", 4,
         __asm__ volatile(X4("vpdpwssd %%zmm20, %%zmm21, %%zmm0\n\t") ::: "zmm0"));
    TIME("vpermw latency", 4, __asm__ volatile(X4("vpermw %%zmm0, %%zmm21, %%zmm0\n\t") ::: "zmm0"));
    TIME("vdpbf16ps, per 16 independent", 1, __asm__ volatile(X16(DPBF) ::: ACC));
    TIME("vfmadd231ps, per 16 independent", 1, __asm__ volatile(X16(FMA) ::: ACC));
    TIME("16 loads of 64 bytes (L1)", 1, __asm__ volatile(X16(LOAD)::"r"(buf) : ACC));
    TIME("16 broadcasts of 8 bytes (L1)", 1, __asm__ volatile(X16(BCAST)::"r"(buf) : ACC));
    __m512i idx = _mm512_setr_epi32(3, 77, 200, 5, 9, 100, 250, 1, 0, 13, 66, 129, 31, 8, 99, 255);
    __m512 acc = _mm512_setzero_ps();
    /* Gathers only depend on each other through the empty asm on idx: this is their issue rate. */
    TIME("vgatherdps, 16 lanes, one after another", 1, {
        acc = _mm512_add_ps(acc, _mm512_i32gather_ps(idx, map, 4));
        __asm__ volatile("" : "+v"(idx));
    });
    float out[16];
    _mm512_storeu_ps(out, acc);
    return out[0] == 1.0f;
}
