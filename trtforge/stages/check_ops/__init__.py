"""Stage 'check-ops': can TensorRT take every node of an ONNX model, before anything is built?

Two sources of truth, chosen by ``use_tensorrt``:

* ``tensorrt-parser``: TensorRT's own ONNX parser, through polygraphy's loaders, where
  TensorRT is installed. The parser reports every node it rejects with its own message.
* ``static-table``: TensorRT's published ONNX operator table, kept in ``trtforge/data`` with
  the TensorRT version it describes. It checks the op type and domain, the opset range, the
  restrictions a static check can see (inputs that must be initializers, attribute values,
  Q/DQ zero points, ranks) and tensor element types TensorRT does not take. It cannot see what
  only the parser sees when it builds the network, and the report says so.

Every node gets ``supported``, ``conditional`` (supported only under a restriction this check
cannot confirm, or with a caveat) or ``unsupported``, with the reason and a fix. The model is
read by ``trtforge.safeio.load_onnx_safely``, and the whole check runs in a child process:
protobuf, onnx's shape inference and TensorRT's parser are native code that can crash on
hostile or unusual files.

Modules: ``report`` (the result), ``table`` (the operator tables), ``loader`` (reading the
model), ``graph`` (what a node can see), ``rules`` (one handler per restriction kind),
``static`` (the static check), ``parser`` (TensorRT's parser), ``stage`` (the stage function).
"""

from trtforge.stages.check_ops.parser import ParserError, merge_parser_result
from trtforge.stages.check_ops.report import STAGE, CompatibilityReport, NodeReport, OpTypeSummary, ReportSummary
from trtforge.stages.check_ops.rules import RULES
from trtforge.stages.check_ops.stage import analyse, check_ops
from trtforge.stages.check_ops.static import StaticResult, static_check
from trtforge.stages.check_ops.table import OperatorTable, available_tables, load_table, table_version_for

__all__ = [
    "RULES",
    "STAGE",
    "CompatibilityReport",
    "NodeReport",
    "OpTypeSummary",
    "OperatorTable",
    "ParserError",
    "ReportSummary",
    "StaticResult",
    "analyse",
    "available_tables",
    "check_ops",
    "load_table",
    "merge_parser_result",
    "static_check",
    "table_version_for",
]
