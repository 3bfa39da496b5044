"""The inference log's row: one per image a served model was asked about, answered or refused.

No pixels: an image is summarised (its size as sent, and the brightness, contrast and blur of what the network
saw), embedded (the model's pooled features projected to `monitor.embedding_dim` dimensions by the projection
stored with the model version) and its answer summarised the same way for every task. A refused row has its
`error` and nulls where nothing was measured. The registered reference profile has the same columns.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA = pa.schema([
    pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),  # when the answer was given
    pa.field("request_id", pa.string(), nullable=False),  # one per predict call (an HTTP request, a predict batch)
    pa.field("row", pa.int32(), nullable=False),  # the image's row in its request
    pa.field("model_name", pa.string()),  # the registered model's name
    pa.field("model_sha256", pa.string()),  # its weights' SHA-256: the version (tag `weights_sha256`)
    pa.field("task", pa.string()),
    pa.field("width", pa.int32()),  # the image as sent
    pa.field("height", pa.int32()),
    pa.field("channels", pa.int8()),
    pa.field("brightness", pa.float32()),  # of the canonical image the network saw: mean / 255
    pa.field("contrast", pa.float32()),  # standard deviation / 255
    pa.field("blur", pa.float32()),  # variance of the Laplacian (low: blurred)
    pa.field("embedding", pa.list_(pa.float32())),  # monitor.embedding_dim values
    pa.field("answer_class", pa.string()),  # classification: the label; detection: the top box's; segmentation: the largest non-background class
    pa.field("confidence", pa.float32()),  # the top probability; the mean box score; the mean pixel top probability
    pa.field("answer_count", pa.int32()),  # 1; boxes; classes present
    pa.field("answer_shares", pa.list_(pa.float32())),  # per class: probabilities; box shares; pixel shares
    pa.field("latency_ms", pa.float32()),  # the request's time divided by its rows
    pa.field("error", pa.string()),  # "" for an answered row
])
COLUMNS = SCHEMA.names
PARTITION = "day"  # the hive partition key of the log's folders: day=YYYY-MM-DD (UTC)
