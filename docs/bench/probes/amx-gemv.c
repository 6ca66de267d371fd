/* Could AMX's int8 tiles carry the one-token NF4 GEMV? A chunk of the tiled layout (16 lanes × 64 weights,
 * 512 bytes of codes) as B tiles of level bytes, the activations as A rows, at the present precision: 13-bit
 * level codes × 14-bit activation codes, each split in a signed high and an unsigned low byte, so four
 * products (tdpbssd, tdpbsud, tdpbusd, tdpbuud). Measures the tile multiply's rate against the number of A
 * rows used (a GEMV uses 2 of 16), and one chunk's whole step: zero 4 C tiles, load 2 B + 2 A tiles, 4
 * multiplies, store 4 C tiles. Timed in TSC ticks and in ns.
 *
 *   cc -O2 -mamx-tile -mamx-int8 docs/bench/probes/amx-gemv.c -o /tmp/amx-gemv && /tmp/amx-gemv
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

static uint8_t a[2 * 16 * 64] __attribute__((aligned(64)));
static uint8_t b[2 * 16 * 64] __attribute__((aligned(64)));
static int32_t c[4 * 16 * 16] __attribute__((aligned(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
        puts("no AMX tile permission");
        return 1;
    }
    const int n = 1000000;
    for (int m = 1; m <= 16; m *= 2) {
        uint8_t cfg[64] __attribute__((aligned(64))) = {0};
        cfg[0] = 1;
        for (int t = 0; t < 8; t++) {
            cfg[16 + 2 * t] = 64; /* 64 bytes per row */
            cfg[48 + t] = t >= 6 ? 16 : m; /* tmm6, tmm7: B, 16 rows; others m rows */
        }
        _tile_loadconfig(cfg);
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        _tile_loadd(4, a, 64); _tile_loadd(5, a, 64); _tile_loadd(6, b, 64); _tile_loadd(7, b + 1024, 64);
        uint64_t t0 = __rdtsc();
        for (int i = 0; i < n; i++) {
            _tile_dpbssd(0, 4, 6); _tile_dpbsud(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbuud(3, 5, 7);
        }
        uint64_t t1 = __rdtsc();
        double s0 = now();
        for (int i = 0; i < n; i++) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            _tile_loadd(6, b, 64); _tile_loadd(7, b + 1024, 64);
            _tile_loadd(4, a, 64); _tile_loadd(5, a + 128, 64);
            _tile_dpbssd(0, 4, 6); _tile_dpbsud(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbuud(3, 5, 7);
            _tile_stored(0, c, 64); _tile_stored(1, c + 256, 64); _tile_stored(2, c + 512, 64);
            _tile_stored(3, c + 768, 64);
        }
        double s1 = now();
        _tile_release();
        double ns = (s1 - s0) / n * 1e9;
        printf("A rows %2d: %.1f ticks per multiply; a chunk's step %.1f ns = %.1f GB/s of NF4 codes\n", m,
               (double)(t1 - t0) / n / 4, ns, 512 / ns);
    }
    return 0;
}
