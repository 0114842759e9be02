"""scripts/trace-summary.py's names for our ops' autograd nodes: the GPU check's trace comes back
only as its summary, so a node the summary fails to recognise would be charged under a C++
wrapper's name on a lent machine, where nobody can rerun it."""
import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "trace-summary.py"
spec = importlib.util.spec_from_file_location("trace_summary", SCRIPT)
trace = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace)


def test_our_nodes_are_named_by_their_function():
    # Since 2026-11-29 the ops' C++ is in namespace s3ops; traces from before have no namespace.
    assert trace.short("torch::autograd::CppNode<s3ops::(anonymous namespace)::PlaneNormFn>") == "PlaneNormFn"
    assert trace.short("torch::autograd::CppNode<(anonymous namespace)::DeformFn>") == "DeformFn"


def test_other_names_are_kept():
    assert trace.short("ConvolutionBackward0") == "ConvolutionBackward0"
    assert trace.short("aten::add") == "aten::add"
