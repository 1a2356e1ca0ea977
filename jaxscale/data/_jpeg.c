/* Crop-window JPEG decode and resize with libjpeg-turbo: what tf.data's fused
 * `decode_and_crop_jpeg` saves, without TensorFlow, and with Pillow's pixels.
 *
 *   decode_resize(data, scale, gray, left, top, right, bottom, width, height) -> bytes
 *
 * returns what Pillow returns for
 *
 *   im = Image.open(io.BytesIO(data)); im.draft(...)    # decoded at DCT scale `scale`/8
 *   im.resize((width, height), Image.BILINEAR, box=(left, top, right, bottom))
 *
 * (the box in the scaled image's pixels): `height` rows of `width` pixels, row-major, each 4
 * bytes R, G, B, X (X undefined: Pillow's own layout, its raw mode "RGBX"), or 1 byte with `gray`.
 *
 * Decoding: only the rows and columns that the resize filter reads, as tf.data does:
 *   - rows above them are entropy-decoded only (`jpeg_skip_scanlines`: no IDCT, no upsampling,
 *     no colour conversion), and rows below them are never read;
 *   - columns outside them are entropy-decoded only (`jpeg_crop_scanline`); one more column is
 *     decoded on each side, as the chroma upsampler treats a cropped row's ends as image edges.
 * These pixels equal a full decode's with libjpeg's defaults, which are Pillow's (accurate
 * integer IDCT, fancy upsampling).
 *
 * Resizing: Pillow's algorithm (src/libImaging/Resample.c), so the result is Pillow's to the
 * bit: the same triangle-filter weights, computed the same way in double precision from the float
 * box and rounded to 22-bit fixed point; the horizontal pass first, over the rows the vertical
 * pass reads, rounded and clipped to 8 bits; then the vertical pass. Only the memory layout
 * differs, so that both passes are weighted sums of whole contiguous lines, which vectorize: the
 * decoded window is stored transposed (column after column), the horizontal pass writes output
 * columns, which are transposed back into rows for the vertical pass. The integer sums are exact
 * whatever the order or the instructions, so the vector and the plain C paths agree.
 *
 * Any libjpeg error *or warning* (corrupt or truncated data) raises ValueError, and so does an
 * unsupported colour space (CMYK, YCCK), so that the caller can fall back to Pillow, which then
 * behaves as it always did on such files. The GIL is released while decoding and resizing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 1005000
#error "libjpeg-turbo >= 1.5 is needed (jpeg_crop_scanline, jpeg_skip_scanlines)"
#endif

/* x86-64: SSE2 is always there (transposes); AVX2 is checked at run time (filter lines). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define X86 1
#include <immintrin.h>
#else
#define X86 0
#endif

/* ---- Pillow's bilinear weights (Resample.c: precompute_coeffs, normalize_coeffs_8bpc) ---- */

#define PRECISION_BITS (32 - 8 - 2)

typedef struct {
  int ksize;        /* weights stored per output pixel */
  int *first;       /* the first input pixel that output pixel i reads */
  int *count;       /* how many it reads */
  int32_t *weight;  /* [i * ksize + t]: input first[i] + t, in units of 2^-PRECISION_BITS */
} Filter;

static double triangle(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

static void filter_free(Filter *f) {
  free(f->first);
  free(f->count);
  free(f->weight);
}

/* The output's `out_size` pixels cover [in0, in1) of an input of `in_size` pixels. Pillow's
 * arithmetic, step by step (float box, double weights), so that the weights match to the bit. */
static int filter_make(Filter *f, int in_size, float in0, float in1, int out_size) {
  double scale = (double)(in1 - in0) / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
  double support = 1.0 * filterscale;  /* the triangle's support is 1 */
  f->ksize = (int)ceil(support) * 2 + 1;
  f->first = malloc(sizeof(int) * out_size);
  f->count = malloc(sizeof(int) * out_size);
  f->weight = malloc(sizeof(int32_t) * out_size * f->ksize);
  double *k = malloc(sizeof(double) * f->ksize);
  if (!f->first || !f->count || !f->weight || !k) {
    free(k);
    return 0;
  }
  for (int xx = 0; xx < out_size; xx++) {
    double center = in0 + (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
    int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
    if (xmin < 0) xmin = 0;
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; x++) {
      k[x] = triangle((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (int x = 0; x < f->ksize; x++) {
      double w = x < xmax ? (ww != 0.0 ? k[x] / ww : k[x]) : 0.0;
      f->weight[xx * f->ksize + x] = (int32_t)(w < 0 ? -0.5 + w * (1 << PRECISION_BITS)
                                                     : 0.5 + w * (1 << PRECISION_BITS));
    }
    f->first[xx] = xmin;
    f->count[xx] = xmax;
  }
  free(k);
  return 1;
}

static inline uint8_t clip8(int32_t sum) {  /* Pillow's clip8 */
  sum >>= PRECISION_BITS;
  return sum < 0 ? 0 : sum > 255 ? 255 : (uint8_t)sum;
}

/* ---- One output line of a pass: a weighted sum of whole input lines ----
 * out[j] = clip8(2^21 + sum over t < n of in[t * stride + j] * k[t]) for j < len. */

static void filter_line_c(uint8_t *restrict out, const uint8_t *restrict in, size_t stride,
                          const int32_t *restrict k, int n, size_t len, size_t j) {
  for (; j < len; j++) {
    int32_t sum = 1 << (PRECISION_BITS - 1);
    for (int t = 0; t < n; t++) sum += (int32_t)in[t * stride + j] * k[t];
    out[j] = clip8(sum);
  }
}

#if X86
/* 32 values at a time: widen 8 bytes to 8 int32, multiply-add in 32 bits (exact), then
 * saturating packs do clip8's clamp to 0..255. */
__attribute__((target("avx2"))) static void filter_line_avx2(
    uint8_t *restrict out, const uint8_t *restrict in, size_t stride, const int32_t *restrict k,
    int n, size_t len) {
  const __m256i half = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  /* undoes the packs' lanes */
  size_t j = 0;
  for (; j + 32 <= len; j += 32) {
    __m256i s0 = half, s1 = half, s2 = half, s3 = half;
    for (int t = 0; t < n; t++) {
      const uint8_t *p = in + t * stride + j;
      const __m256i w = _mm256_set1_epi32(k[t]);
#define TERM(i) \
  _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * (i)))), w)
      s0 = _mm256_add_epi32(s0, TERM(0));
      s1 = _mm256_add_epi32(s1, TERM(1));
      s2 = _mm256_add_epi32(s2, TERM(2));
      s3 = _mm256_add_epi32(s3, TERM(3));
#undef TERM
    }
    __m256i lo = _mm256_packs_epi32(_mm256_srai_epi32(s0, PRECISION_BITS),
                                    _mm256_srai_epi32(s1, PRECISION_BITS));
    __m256i hi = _mm256_packs_epi32(_mm256_srai_epi32(s2, PRECISION_BITS),
                                    _mm256_srai_epi32(s3, PRECISION_BITS));
    __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(lo, hi), order);
    _mm256_storeu_si256((__m256i *)(out + j), bytes);
  }
  filter_line_c(out, in, stride, k, n, len, j);
}

static int have_avx2;
#endif

static void filter_line(uint8_t *out, const uint8_t *in, size_t stride, const int32_t *k, int n,
                        size_t len) {
#if X86
  if (have_avx2) {
    filter_line_avx2(out, in, stride, k, n, len);
    return;
  }
#endif
  filter_line_c(out, in, stride, k, n, len, 0);
}

/* ---- Transposes: dst[x * dst_stride + y] = src[y * src_stride + x], rows x cols ---- */

static void transpose8(uint8_t *restrict dst, size_t dst_stride, const uint8_t *restrict src,
                       size_t src_stride, size_t rows, size_t cols) {
  for (size_t y = 0; y < rows; y++)
    for (size_t x = 0; x < cols; x++) dst[x * dst_stride + y] = src[y * src_stride + x];
}

/* Pixels of 4 bytes, by blocks of 4 x 4 in SSE2 registers (plain C for the edges). The caller
 * passes blocks of at most a few dozen rows, so that the columns written stay in the cache. */
static void transpose32(uint32_t *restrict dst, size_t dst_stride, const uint32_t *restrict src,
                        size_t src_stride, size_t rows, size_t cols) {
  size_t y = 0;
#if X86
  for (; y + 4 <= rows; y += 4) {
    const uint32_t *s = src + y * src_stride;
    size_t x = 0;
    for (; x + 4 <= cols; x += 4) {
      __m128i r0 = _mm_loadu_si128((const __m128i *)(s + x));
      __m128i r1 = _mm_loadu_si128((const __m128i *)(s + src_stride + x));
      __m128i r2 = _mm_loadu_si128((const __m128i *)(s + 2 * src_stride + x));
      __m128i r3 = _mm_loadu_si128((const __m128i *)(s + 3 * src_stride + x));
      __m128i t0 = _mm_unpacklo_epi32(r0, r1), t1 = _mm_unpacklo_epi32(r2, r3);
      __m128i t2 = _mm_unpackhi_epi32(r0, r1), t3 = _mm_unpackhi_epi32(r2, r3);
      uint32_t *d = dst + x * dst_stride + y;
      _mm_storeu_si128((__m128i *)d, _mm_unpacklo_epi64(t0, t1));
      _mm_storeu_si128((__m128i *)(d + dst_stride), _mm_unpackhi_epi64(t0, t1));
      _mm_storeu_si128((__m128i *)(d + 2 * dst_stride), _mm_unpacklo_epi64(t2, t3));
      _mm_storeu_si128((__m128i *)(d + 3 * dst_stride), _mm_unpackhi_epi64(t2, t3));
    }
    for (; x < cols; x++)
      for (size_t i = 0; i < 4; i++) dst[x * dst_stride + y + i] = s[i * src_stride + x];
  }
#endif
  for (; y < rows; y++)
    for (size_t x = 0; x < cols; x++) dst[x * dst_stride + y] = src[y * src_stride + x];
}

/* In pixels of `pixel_size` bytes (4 or 1), strides in pixels. */
static void transpose(void *dst, size_t dst_stride, const void *src, size_t src_stride,
                      size_t rows, size_t cols, int pixel_size) {
  if (pixel_size == 4)
    transpose32(dst, dst_stride, src, src_stride, rows, cols);
  else
    transpose8(dst, dst_stride, src, src_stride, rows, cols);
}

/* ---- libjpeg plumbing ---- */

typedef struct {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void on_error(j_common_ptr cinfo) {  /* libjpeg's error_exit must not return */
  ErrorManager *err = (ErrorManager *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo) { (void)cinfo; /* warnings are counted, not printed */ }

typedef struct {
  const unsigned char *data;
  size_t size;
  int scale, gray;
  float box[4];
  int width, height;
  uint8_t *out;                   /* height * width pixels, filled by decode() */
  char message[JMSG_LENGTH_MAX];  /* why it failed */
} Job;

/* What decode() allocates: freed by run(), also after a libjpeg error's longjmp. */
typedef struct {
  struct jpeg_decompress_struct cinfo;
  ErrorManager err;
  Filter horizontal, vertical;
  uint8_t *block, *columns, *tmp, *lines;
} Work;

#define BLOCK 16 /* rows decoded, then transposed, at a time */

/* Decodes the window and resizes it into job->out. NULL, or an error message. */
static const char *decode(Job *job, Work *w) {
  struct jpeg_decompress_struct *cinfo = &w->cinfo;
  const int p = job->gray ? 1 : 4;  /* bytes per pixel */
  const float *box = job->box;

  cinfo->err = jpeg_std_error(&w->err.pub);
  w->err.pub.error_exit = on_error;
  w->err.pub.output_message = on_message;
  if (setjmp(w->err.jump)) return w->err.message;
  jpeg_create_decompress(cinfo);
  jpeg_mem_src(cinfo, job->data, (unsigned long)job->size);
  jpeg_read_header(cinfo, TRUE);
  /* Only the colour spaces whose conversion Pillow and libjpeg do alike. */
  if (job->gray ? cinfo->jpeg_color_space != JCS_GRAYSCALE
                : cinfo->num_components != 3 || (cinfo->jpeg_color_space != JCS_YCbCr &&
                                                 cinfo->jpeg_color_space != JCS_RGB))
    return "unsupported colour space";
  cinfo->out_color_space = job->gray ? JCS_GRAYSCALE : JCS_EXT_RGBX;
  cinfo->scale_num = (unsigned int)job->scale;
  cinfo->scale_denom = 8;
  jpeg_start_decompress(cinfo);
  const int iw = (int)cinfo->output_width, ih = (int)cinfo->output_height;
  if (!(box[0] >= 0 && box[1] >= 0 && box[2] <= iw && box[3] <= ih && box[0] <= box[2] &&
        box[1] <= box[3]))
    return "box outside the image";
  Filter *hf = &w->horizontal, *vf = &w->vertical;
  if (!filter_make(hf, iw, box[0], box[2], job->width) ||
      !filter_make(vf, ih, box[1], box[3], job->height))
    return "out of memory";
  /* The input rows [y0, y1) and columns [x0, x1) that the filters read. */
  const int y0 = vf->first[0], y1 = vf->first[job->height - 1] + vf->count[job->height - 1];
  const int x0 = hf->first[0], x1 = hf->first[job->width - 1] + hf->count[job->width - 1];
  const size_t rows = (size_t)(y1 - y0), cols = (size_t)(x1 - x0);
  const size_t width = (size_t)job->width, height = (size_t)job->height;

  /* Decode only [crop_x, crop_x + crop_w), one column wider on each side than needed;
   * jpeg_crop_scanline moves crop_x left to an iMCU boundary (and widens crop_w to match). */
  JDIMENSION crop_x = x0 > 0 ? (JDIMENSION)(x0 - 1) : 0;
  JDIMENSION crop_w = (JDIMENSION)(x1 < iw ? x1 + 1 : iw) - crop_x;
  if (crop_w < (JDIMENSION)iw) jpeg_crop_scanline(cinfo, &crop_x, &crop_w);
  if (y0 > 0 && jpeg_skip_scanlines(cinfo, (JDIMENSION)y0) != (JDIMENSION)y0)
    return "could not skip to the window";
  w->block = malloc((size_t)crop_w * p * BLOCK);
  w->columns = malloc(cols * rows * p);  /* the window, column after column */
  w->tmp = malloc(width * rows * p);     /* the horizontal pass's output columns */
  w->lines = malloc(width * rows * p);   /* the same as rows */
  if (!w->block || !w->columns || !w->tmp || !w->lines) return "out of memory";

  for (size_t y = 0; y < rows;) {  /* BLOCK rows at a time, stored transposed */
    JSAMPROW pointers[BLOCK];
    size_t n = rows - y < BLOCK ? rows - y : BLOCK, got = 0;
    for (size_t i = 0; i < n; i++) pointers[i] = w->block + i * crop_w * p;
    while (got < n) {
      JDIMENSION read = jpeg_read_scanlines(cinfo, pointers + got, (JDIMENSION)(n - got));
      if (!read) return "no scanline read";
      got += read;
    }
    transpose(w->columns + y * p, rows, w->block + (size_t)(x0 - (int)crop_x) * p, crop_w, n,
              cols, p);
    y += n;
  }
  if (w->err.pub.num_warnings) return "corrupt JPEG data";  /* let Pillow decide */

  /* Horizontal pass: output column i is a weighted sum of whole input columns. */
  for (size_t i = 0; i < width; i++)
    filter_line(w->tmp + i * rows * p, w->columns + (size_t)(hf->first[i] - x0) * rows * p,
                rows * p, hf->weight + i * hf->ksize, hf->count[i], rows * p);
  for (size_t i = 0; i < width; i += BLOCK)  /* back to rows */
    transpose(w->lines + i * p, width, w->tmp + i * rows * p, rows,
              width - i < BLOCK ? width - i : BLOCK, rows, p);
  /* Vertical pass: output row i is a weighted sum of whole rows. */
  for (size_t i = 0; i < height; i++)
    filter_line(job->out + i * width * p, w->lines + (size_t)(vf->first[i] - y0) * width * p,
                width * p, vf->weight + i * vf->ksize, vf->count[i], width * p);
  return NULL;
}

static const char *run(Job *job) {
  Work w;
  memset(&w, 0, sizeof w);  /* a NULL cinfo.mem makes jpeg_destroy a no-op */
  const char *failure = decode(job, &w);
  jpeg_destroy_decompress(&w.cinfo);  /* also abandons the rows below the window */
  filter_free(&w.horizontal);
  filter_free(&w.vertical);
  free(w.block);
  free(w.columns);
  free(w.tmp);
  free(w.lines);
  if (!failure) return NULL;
  snprintf(job->message, sizeof job->message, "%s", failure);  /* outlives w */
  return job->message;
}

static PyObject *decode_resize(PyObject *self, PyObject *args) {
  (void)self;
  Py_buffer data;
  Job job;
  int gray;
  if (!PyArg_ParseTuple(args, "y*ipffffii:decode_resize", &data, &job.scale, &gray, &job.box[0],
                        &job.box[1], &job.box[2], &job.box[3], &job.width, &job.height))
    return NULL;
  if (job.scale < 1 || job.scale > 8 || job.width < 1 || job.height < 1 ||
      job.width > 65535 || job.height > 65535) {
    PyBuffer_Release(&data);
    PyErr_SetString(PyExc_ValueError, "scale must be 1..8 (eighths), the size 1..65535");
    return NULL;
  }
  job.gray = gray;
  PyObject *out =
      PyBytes_FromStringAndSize(NULL, (Py_ssize_t)job.width * job.height * (gray ? 1 : 4));
  if (!out) {
    PyBuffer_Release(&data);
    return NULL;
  }
  job.data = data.buf;
  job.size = (size_t)data.len;
  job.out = (uint8_t *)PyBytes_AS_STRING(out);
  const char *failure;
  Py_BEGIN_ALLOW_THREADS
  failure = run(&job);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&data);
  if (failure) {
    Py_DECREF(out);
    PyErr_SetString(PyExc_ValueError, failure);
    return NULL;
  }
  return out;
}

static PyMethodDef methods[] = {
    {"decode_resize", decode_resize, METH_VARARGS,
     "decode_resize(data, scale, gray, left, top, right, bottom, width, height) -> bytes: the "
     "box of the JPEG decoded at scale/8, resized as Pillow's BILINEAR, RGBX (or L) pixels."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg", "Crop-window JPEG decode and resize with libjpeg-turbo.", -1,
    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jpeg(void) {
#if X86
  have_avx2 = __builtin_cpu_supports("avx2");
#endif
  PyObject *m = PyModule_Create(&module);
  if (m && PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER",
                                   LIBJPEG_TURBO_VERSION_NUMBER) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
