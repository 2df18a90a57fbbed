// Internal helpers shared by the csrc/*.cu translation units (not part of the C ABI).
//
// Everything here has hidden visibility (the library is built with
// -fvisibility=hidden): only the pk_* functions of peft_kernels.h are exported.
#ifndef PK_COMMON_CUH
#define PK_COMMON_CUH

#include <stdint.h>

#define PK_HD __host__ __device__ __forceinline__

#ifdef __CUDA_ARCH__
#define PK_LDG(ptr) __ldg(ptr)
#define PK_UNROLL _Pragma("unroll")
#else
#define PK_LDG(ptr) (*(ptr))
#define PK_UNROLL
#endif

namespace pk_detail {

// Formats the per-thread error text (pk_last_error) and returns `code`.
int set_error(int code, const char* fmt, ...);
// Clears the error text and returns PK_OK.
int ok();

}  // namespace pk_detail

#endif  // PK_COMMON_CUH
