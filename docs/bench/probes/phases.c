/* How steady the memory's streaming rate is on a shared machine: reads a 512 MiB buffer (huge pages,
 * AVX-512 loads, one slice per OpenMP thread) over and over and prints each pass's GB/s, for SECONDS.
 * On the Zen 5 guest of BENCHMARKS.md two threads read 30-40 GB/s for a second or more, then 50-64, then
 * back: the reason `ringlm bench` reads the memory between its decode steps.
 *
 *   cc -O2 -mavx512f -fopenmp docs/bench/probes/phases.c -o /tmp/phases && OMP_NUM_THREADS=2 /tmp/phases 8
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t len = (size_t)512 << 20;
    int seconds = argc > 1 ? atoi(argv[1]) : 10;
    char *buf = aligned_alloc(1 << 21, len);
    madvise(buf, len, MADV_HUGEPAGE);
    memset(buf, 1, len);
    volatile long sink = 0;
    double start = now();
    while (now() - start < seconds) {
        double t = now();
#pragma omp parallel
        {
            int id = omp_get_thread_num(), n = omp_get_num_threads();
            size_t per = len / n;
            const char *p = buf + id * per;
            /* Four independent chains, so the loads, not an xor chain, set the pace. */
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (size_t i = 0; i < per; i += 256) {
                a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
                a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + i + 64));
                a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + i + 128));
                a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + i + 192));
            }
            __m512i a = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
            sink += _mm512_reduce_add_epi64(a);
        }
        printf("%.1f ", len / (now() - t) / 1e9);
        fflush(stdout);
    }
    printf("\n");
    return 0;
}
