/* TVM's thread pool for kiln's C kernels: TVM's library loader fills in the pointer
   __TVMBackendParallelLaunch in every library it loads (declared weak: one symbol with the
   one TVM's codegen emits), as in the code TVM generates. Without it (a harness) the task
   runs alone. */
#ifndef KILN_POOL_H
#define KILN_POOL_H

#include <stdint.h>

typedef struct { void* sync_handle; int32_t num_task; } kiln_penv;
typedef int (*kiln_lambda)(int task_id, kiln_penv* penv, void* cdata);
typedef int (*kiln_launch)(kiln_lambda flambda, void* cdata, int num_task);
void* __TVMBackendParallelLaunch __attribute__((weak)) = 0;

/* f over the pool's threads; nonzero when a task returned nonzero */
static inline int kiln_parallel(kiln_lambda f, void* cdata) {
  kiln_launch launch = (kiln_launch)__TVMBackendParallelLaunch;
  if (launch) return launch(f, cdata, 0);
  kiln_penv env = {0, 1};
  return f(0, &env, cdata);
}

#endif /* KILN_POOL_H */
