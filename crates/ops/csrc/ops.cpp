// The ops' one translation unit: each op lives in a file of its own (below), but they are
// compiled together. Why: libtorch's headers take about 10 s to parse here, and compiled one by
// one the seven files took 106 s of CPU against 30 s as one (2-core build machine,
// 2026-11-29). Each file also compiles alone (it includes common.h), for editors and
// `g++ -fsyntax-only`; file-local names stay in an unnamed namespace per file.

#include "common.cpp"
#include "deform.cpp"
#include "depthwise.cpp"
#include "losses.cpp"
#include "norm.cpp"
#include "pointwise.cpp"
#include "runtime.cpp"
