/*
 * The fused element-wise pass of wsurgery's float compare kernel (wsurgery/compare/fused.py).
 *
 * A plain shared library, loaded with ctypes (no Python API: ctypes releases the GIL for
 * the call, so the kernel's worker threads run it in parallel). One call per block of at
 * most 64 Ki element pairs reads both raw inputs once and
 *   - writes the float64 buffers A = a, B = b and D = a - b, which the BLAS dot products
 *     of the caller then read (those sums stay BLAS's: this file sums nothing),
 *   - counts the equal pairs: raw bits when both sides have the same dtype, float64 bits
 *     otherwise (the numpy passes' rules),
 *   - gives max |a - b| and max |(a - b) / b| over the quotients that are not NaN (NaN when
 *     every one is), and with a tolerance the pairs where |a - b| <= atol + rtol * |b|.
 * Same-dtype blocks whose bytes are identical only get A written.
 *
 * Given the BLAS ddot that numpy's np.dot calls (the caller finds it and checks it against
 * np.dot to the bit), a call also takes the dot products of each block, as np.dot does
 * (0.0 + one cblas_ddot call over the block): a run of blocks then needs one call and no
 * Python in between. The summation order stays BLAS's own.
 *
 * Every operation is an exact IEEE one (casts to float64, one subtraction, one division,
 * one multiplication and one addition for the bound, comparisons, maxima of non-negative
 * values): the results are those of the numpy passes to the bit, whatever the order in
 * which the lanes are visited. Build with -fno-fast-math -ffp-contract=off (no FMA
 * contraction of rtol * |b| + atol); never -ffast-math.
 */
#include <fenv.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define WS_ABI 3

enum { K_F64 = 0, K_F32 = 1, K_F16 = 2, K_BF16 = 3 };
enum { F_TOLERANCE = 1, F_PORTABLE = 2, F_DOT_ILP64 = 4 };

typedef struct {
    int64_t equal;     /* pairs equal: raw bits (same dtype) or float64 bits */
    int64_t close;     /* with F_TOLERANCE: pairs with |a - b| <= atol + rtol * |b| */
    double max_abs;    /* max |a - b| */
    double max_rel;    /* max |(a - b) / b| over non-NaN quotients; NaN if none */
    double aa, bb, ab, dd; /* with a dot function: A.A, and unless identical B.B, A.B, D.D */
    int32_t identical; /* same dtype, identical bytes: only A written */
    int32_t vector;    /* the x86 vector loops ran (else the portable ones) */
} ws_result;

typedef double (*ddot64_fn)(int64_t, const double *, int64_t, const double *, int64_t);
typedef double (*ddot32_fn)(int, const double *, int, const double *, int);

int wsurgery_fused_abi(void) { return WS_ABI; }

static const int SIZES[4] = {8, 4, 2, 2};

/* ------------------------------------------------------------------ portable loops */

#define INLINE static inline __attribute__((always_inline))

/* float16 bits to float64 with masks, not branches (so that the portable loop vectorizes):
 * normal values 2^(exp - 15) (1 + man / 1024), subnormals man 2^-24 (exact), exp 31 inf or NaN */
INLINE double f16_to_f64(uint16_t h) {
    uint64_t sign = (uint64_t)(h >> 15) << 63, exp = (h >> 10) & 0x1f, man = h & 0x3ff, sub;
    double tiny = (double)(int32_t)man * 0x1p-24;
    memcpy(&sub, &tiny, 8);
    uint64_t is_sub = -(uint64_t)(exp == 0), is_special = -(uint64_t)(exp == 31);
    uint64_t e = (((exp + 1008) << 52) & ~is_special) | ((0x7ffull << 52) & is_special);
    uint64_t bits = sign | (sub & is_sub) | ((e | (man << 42)) & ~is_sub);
    double v;
    memcpy(&v, &bits, 8);
    return v;
}

INLINE double load1(int k, const unsigned char *p, int64_t i) {
    if (k == K_F64) {
        double v;
        memcpy(&v, p + 8 * i, 8);
        return v;
    }
    if (k == K_F32) {
        float v;
        memcpy(&v, p + 4 * i, 4);
        return (double)v;
    }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    if (k == K_F16) return f16_to_f64(h);
    uint32_t bits = (uint32_t)h << 16;
    float v;
    memcpy(&v, &bits, 4);
    return (double)v;
}

/* the raw bytes of element i in an integer (compared for equality only: any byte order) */
INLINE uint64_t raw1(int k, const unsigned char *p, int64_t i) {
    uint64_t v = 0;
    memcpy(&v, p + (int64_t)SIZES[k] * i, (size_t)SIZES[k]);
    return v;
}

INLINE int64_t bits1(double x) {
    int64_t u;
    memcpy(&u, &x, 8);
    return u;
}

INLINE double from_bits(int64_t u) {
    double x;
    memcpy(&x, &u, 8);
    return x;
}

INLINE void cast_tail(int ka, const unsigned char *a, int64_t i, int64_t n, double *A) {
    for (; i < n; i++) A[i] = load1(ka, a, i);
}

/* Elements [i, n) of a block: the portable loop, also the vector loops' tail. Every value
 * compared is >= +0 or NaN, and such values order as their bit patterns do as integers
 * (NaN above inf): the comparisons and maxima are integer ones, which compilers vectorize
 * (a floating-point comparison may trap, which keeps them from it). */
#define INF_BITS 0x7ff0000000000000ll
INLINE void tail(int ka, int kb, int tol, const unsigned char *a, const unsigned char *b, int64_t i, int64_t n,
                 double *A, double *B, double *D, double atol, double rtol, ws_result *r) {
    int64_t equal = 0, close = 0, numbers = 0, max_abs = 0, max_rel = 0;
    for (; i < n; i++) {
        double x = load1(ka, a, i), y = load1(kb, b, i), d = x - y;
        A[i] = x;
        B[i] = y;
        D[i] = d;
        equal += ka == kb ? raw1(ka, a, i) == raw1(kb, b, i) : bits1(x) == bits1(y);
        int64_t kd = bits1(fabs(d)), kq = bits1(fabs(d / y)), number = kq <= INF_BITS;
        if (tol) {
            int64_t kb_ = bits1(fabs(y) * rtol + atol); /* + 0.0 changes no value >= +0 */
            close += (kd <= kb_) & (kb_ <= INF_BITS); /* |a - b| <= bound, false with a NaN */
        }
        numbers += number;
        kq = number ? kq : 0; /* NaN quotients (0 / 0) are skipped */
        max_abs = kd > max_abs ? kd : max_abs;
        max_rel = kq > max_rel ? kq : max_rel;
    }
    r->equal += equal;
    r->close += close;
    if (from_bits(max_abs) > r->max_abs) r->max_abs = from_bits(max_abs);
    if (numbers && from_bits(max_rel) > r->max_rel) r->max_rel = from_bits(max_rel);
}

/* ------------------------------------------------------------------ x86 vector loops */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define WS_VECTOR 1

#define VEC static inline __attribute__((always_inline, target("avx2,f16c,popcnt")))

static int have_avx2;

__attribute__((constructor)) static void detect(void) {
    unsigned int eax, ebx, ecx, edx;
    __builtin_cpu_init();
    int f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
    have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") && f16c;
}

/* four elements of kind k as float64 */
VEC __m256d load4(int k, const unsigned char *p) {
    if (k == K_F64) return _mm256_loadu_pd((const double *)p);
    if (k == K_F32) return _mm256_cvtps_pd(_mm_loadu_ps((const float *)p));
    __m128i h = _mm_loadl_epi64((const __m128i *)p);
    if (k == K_F16) return _mm256_cvtps_pd(_mm_cvtph_ps(h));
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
}

/* how many of four elements have the same raw bytes on both sides (same kind k) */
VEC int raw_eq4(int k, const unsigned char *a, const unsigned char *b) {
    if (k == K_F64) {
        __m256i e = _mm256_cmpeq_epi64(_mm256_loadu_si256((const __m256i *)a), _mm256_loadu_si256((const __m256i *)b));
        return __builtin_popcount((unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(e)));
    }
    if (k == K_F32) {
        __m128i e = _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)a), _mm_loadu_si128((const __m128i *)b));
        return __builtin_popcount((unsigned)_mm_movemask_ps(_mm_castsi128_ps(e)));
    }
    __m128i e = _mm_cmpeq_epi16(_mm_loadl_epi64((const __m128i *)a), _mm_loadl_epi64((const __m128i *)b));
    return __builtin_popcount((unsigned)_mm_movemask_epi8(e) & 0xffu) >> 1;
}

VEC double hmax(__m256d v) { /* of non-negative, non-NaN lanes: any order gives the same */
    __m128d m = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    m = _mm_max_pd(m, _mm_unpackhi_pd(m, m));
    return _mm_cvtsd_f64(m);
}

VEC void cast_avx2(int ka, const unsigned char *a, int64_t n, double *A) {
    int sa = SIZES[ka];
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) _mm256_storeu_pd(A + i, load4(ka, a + sa * i));
    cast_tail(ka, a, i, n, A);
}

VEC void block_avx2(int ka, int kb, int tol, const unsigned char *a, const unsigned char *b, int64_t n, double *A,
                    double *B, double *D, double atol, double rtol, ws_result *r) {
    const int sa = SIZES[ka], sb = SIZES[kb], same = ka == kb;
    const __m256d sign = _mm256_set1_pd(-0.0), vrtol = _mm256_set1_pd(rtol), vatol = _mm256_set1_pd(atol);
    __m256d max_abs = _mm256_setzero_pd(), max_rel = _mm256_set1_pd(-INFINITY);
    int64_t equal = 0, close = 0, i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256d x = load4(ka, a + sa * i), y = load4(kb, b + sb * i), d = _mm256_sub_pd(x, y);
        _mm256_storeu_pd(A + i, x);
        _mm256_storeu_pd(B + i, y);
        _mm256_storeu_pd(D + i, d);
        if (same)
            equal += raw_eq4(ka, a + sa * i, b + sa * i);
        else
            equal += __builtin_popcount((unsigned)_mm256_movemask_pd(
                _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_castpd_si256(x), _mm256_castpd_si256(y)))));
        __m256d ad = _mm256_andnot_pd(sign, d);
        if (tol) {
            __m256d bound = _mm256_mul_pd(_mm256_andnot_pd(sign, y), vrtol);
            if (atol != 0.0) bound = _mm256_add_pd(bound, vatol);
            close += __builtin_popcount((unsigned)_mm256_movemask_pd(_mm256_cmp_pd(ad, bound, _CMP_LE_OQ)));
        }
        /* max_pd(v, m) is m where v is NaN: NaN quotients (0 / 0) are skipped */
        max_abs = _mm256_max_pd(ad, max_abs);
        max_rel = _mm256_max_pd(_mm256_andnot_pd(sign, _mm256_div_pd(d, y)), max_rel);
    }
    r->equal = equal;
    r->close = close;
    r->max_abs = hmax(max_abs);
    r->max_rel = hmax(max_rel);
    tail(ka, kb, tol, a, b, i, n, A, B, D, atol, rtol, r);
}
#else
static const int have_avx2 = 0;
#endif

/* ------------------------------------------------------------------ entry point */

/* Whether the loops run vectorized here: the AVX2 ones on x86-64, the portable ones on
 * aarch64 (compilers vectorize them for NEON); elsewhere (x86-64 without AVX2: SSE2 has
 * no 64-bit integer comparison) they are slower than numpy's, and the caller keeps numpy. */
int wsurgery_fused_fast(void) {
#if defined(__aarch64__)
    return 1;
#else
    return have_avx2;
#endif
}

typedef void (*block_fn)(const unsigned char *, const unsigned char *, int64_t, double *, double *, double *, double,
                         double, ws_result *);
typedef void (*cast_fn)(const unsigned char *, int64_t, double *);

/* one function per (kind a, kind b, tolerance): the kinds are constants in each */
#define BLOCK_FN(pre, attr, body, KA, KB, TOL)                                                                      \
    attr static void pre##_##KA##_##KB##_##TOL(const unsigned char *a, const unsigned char *b, int64_t n, double *A, \
                                               double *B, double *D, double atol, double rtol, ws_result *r) {      \
        body(KA, KB, TOL, a, b, n, A, B, D, atol, rtol, r);                                                          \
    }
#define CAST_FN(pre, attr, body, KA)                                                                                 \
    attr static void pre##_cast_##KA(const unsigned char *a, int64_t n, double *A) { body(KA, a, n, A); }
#define FAMILY(pre, attr, block, cast)                                                                               \
    BLOCK_FN(pre, attr, block, 0, 0, 0) BLOCK_FN(pre, attr, block, 0, 1, 0) BLOCK_FN(pre, attr, block, 0, 2, 0)    \
    BLOCK_FN(pre, attr, block, 0, 3, 0) BLOCK_FN(pre, attr, block, 1, 0, 0) BLOCK_FN(pre, attr, block, 1, 1, 0)    \
    BLOCK_FN(pre, attr, block, 1, 2, 0) BLOCK_FN(pre, attr, block, 1, 3, 0) BLOCK_FN(pre, attr, block, 2, 0, 0)    \
    BLOCK_FN(pre, attr, block, 2, 1, 0) BLOCK_FN(pre, attr, block, 2, 2, 0) BLOCK_FN(pre, attr, block, 2, 3, 0)    \
    BLOCK_FN(pre, attr, block, 3, 0, 0) BLOCK_FN(pre, attr, block, 3, 1, 0) BLOCK_FN(pre, attr, block, 3, 2, 0)    \
    BLOCK_FN(pre, attr, block, 3, 3, 0) BLOCK_FN(pre, attr, block, 0, 0, 1) BLOCK_FN(pre, attr, block, 0, 1, 1)    \
    BLOCK_FN(pre, attr, block, 0, 2, 1) BLOCK_FN(pre, attr, block, 0, 3, 1) BLOCK_FN(pre, attr, block, 1, 0, 1)    \
    BLOCK_FN(pre, attr, block, 1, 1, 1) BLOCK_FN(pre, attr, block, 1, 2, 1) BLOCK_FN(pre, attr, block, 1, 3, 1)    \
    BLOCK_FN(pre, attr, block, 2, 0, 1) BLOCK_FN(pre, attr, block, 2, 1, 1) BLOCK_FN(pre, attr, block, 2, 2, 1)    \
    BLOCK_FN(pre, attr, block, 2, 3, 1) BLOCK_FN(pre, attr, block, 3, 0, 1) BLOCK_FN(pre, attr, block, 3, 1, 1)    \
    BLOCK_FN(pre, attr, block, 3, 2, 1) BLOCK_FN(pre, attr, block, 3, 3, 1) CAST_FN(pre, attr, cast, 0)            \
    CAST_FN(pre, attr, cast, 1) CAST_FN(pre, attr, cast, 2) CAST_FN(pre, attr, cast, 3)                             \
    static const block_fn pre##_blocks[2][16] = {                                                                    \
        {pre##_0_0_0, pre##_0_1_0, pre##_0_2_0, pre##_0_3_0, pre##_1_0_0, pre##_1_1_0, pre##_1_2_0, pre##_1_3_0,     \
         pre##_2_0_0, pre##_2_1_0, pre##_2_2_0, pre##_2_3_0, pre##_3_0_0, pre##_3_1_0, pre##_3_2_0, pre##_3_3_0},    \
        {pre##_0_0_1, pre##_0_1_1, pre##_0_2_1, pre##_0_3_1, pre##_1_0_1, pre##_1_1_1, pre##_1_2_1, pre##_1_3_1,     \
         pre##_2_0_1, pre##_2_1_1, pre##_2_2_1, pre##_2_3_1, pre##_3_0_1, pre##_3_1_1, pre##_3_2_1, pre##_3_3_1}};   \
    static const cast_fn pre##_casts[4] = {pre##_cast_0, pre##_cast_1, pre##_cast_2, pre##_cast_3};

#define PORTABLE_BLOCK(KA, KB, TOL, a, b, n, A, B, D, atol, rtol, r) tail(KA, KB, TOL, a, b, 0, n, A, B, D, atol, rtol, r)
#define PORTABLE_CAST(KA, a, n, A) cast_tail(KA, a, 0, n, A)
FAMILY(portable, , PORTABLE_BLOCK, PORTABLE_CAST)
#ifdef WS_VECTOR
FAMILY(avx2, __attribute__((target("avx2,f16c,popcnt"))), block_avx2, cast_avx2)
#endif

/* np.dot of two float64 vectors with BLAS: "sum = 0.; sum += cblas_ddot(n, x, 1, y, 1)";
 * a vector of one element is a scalar to np.dot: a product */
static double blas_dot(void *fn, int flags, int64_t n, const double *x, const double *y) {
    if (n == 1) return x[0] * y[0];
    double sum = 0.0;
    if (flags & F_DOT_ILP64)
        sum += ((ddot64_fn)fn)(n, x, 1, y, 1);
    else
        sum += ((ddot32_fn)fn)((int)n, x, 1, y, 1);
    return sum;
}

/* For the caller's check of the dot function against np.dot. */
double wsurgery_fused_dot(void *fn, int flags, int64_t n, const double *x, const double *y) {
    return blas_dot(fn, flags, n, x, y);
}

/*
 * The blocks of n pairs, of at most `block` pairs each: a and b hold n elements of kinds ka
 * and kb (0 float64, 1 float32, 2 float16, 3 bfloat16; any alignment); A, B and D have
 * room for `block` float64 values; out[k] gets block k's results. flags: F_TOLERANCE
 * (count the close pairs against atol and rtol), F_PORTABLE (the portable loops even where
 * the vector ones could run), F_DOT_ILP64 (dot takes 64-bit sizes). dot: a cblas_ddot, or
 * NULL for one block (n <= block) whose dot products the caller takes from A, B and D.
 * Returns 0, or -1 for arguments out of range. The floating-point exception flags are
 * left as they were.
 */
int wsurgery_fused_blocks(int ka, int kb, const void *a_, const void *b_, int64_t n, int64_t block, double *A,
                          double *B, double *D, double atol, double rtol, int flags, void *dot, ws_result *out) {
    const unsigned char *a = (const unsigned char *)a_, *b = (const unsigned char *)b_;
    if (ka < 0 || ka > 3 || kb < 0 || kb > 3 || n < 0 || block < 1 || (dot == NULL && n > block)) return -1;
    int tol = (flags & F_TOLERANCE) != 0, vec = have_avx2 && !(flags & F_PORTABLE);
    const block_fn *blocks = portable_blocks[tol];
    const cast_fn *casts = portable_casts;
#ifdef WS_VECTOR
    if (vec) {
        blocks = avx2_blocks[tol];
        casts = avx2_casts;
    }
#endif
    fexcept_t saved;
    fegetexceptflag(&saved, FE_ALL_EXCEPT);
    for (int64_t start = 0, k = 0; start < n || k == 0; start += block, k++) {
        int64_t m = n - start < block ? n - start : block;
        const unsigned char *x = a + start * SIZES[ka], *y = b + start * SIZES[kb];
        ws_result *r = out + k;
        memset(r, 0, sizeof *r);
        r->max_rel = -INFINITY;
        r->vector = vec;
        if (ka == kb && memcmp(x, y, (size_t)m * (size_t)SIZES[ka]) == 0) {
            r->identical = 1;
            r->equal = m;
            casts[ka](x, m, A);
        } else {
            blocks[ka * 4 + kb](x, y, m, A, B, D, atol, rtol, r);
        }
        if (r->max_rel == -INFINITY) r->max_rel = NAN; /* every quotient NaN (or none) */
        if (dot != NULL) {
            r->aa = blas_dot(dot, flags, m, A, A);
            if (!r->identical) {
                r->bb = blas_dot(dot, flags, m, B, B);
                r->ab = blas_dot(dot, flags, m, A, B);
                r->dd = blas_dot(dot, flags, m, D, D);
            }
        }
        if (m == 0) break;
    }
    fesetexceptflag(&saved, FE_ALL_EXCEPT);
    return 0;
}
