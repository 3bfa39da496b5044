"""The production loop: what the served model sees and answers, drift against the registered reference, and
the retraining trigger.

- `log_schema`: the inference log's row (one per image a served model was asked about).
- `inference_log`: the log's writer (Parquet files in a folder per day, local or S3, from a background thread)
  and reader.
- `samples`: the raw images a served model keeps for labelling (`monitor.sample_images`), beside the log.
- `served_log`: the served model's rows (opened in the pyfunc's `load_context`, written from `predict_values`).
- `summaries`, `embedding`: a row's image and answer summaries; its embedding (pooled features, projected).
- `reference`: the version's projection and reference profile, built at registration; `load_reference`.
- `drift`, `estimate`, `report`: one window's judgement against the reference (`judge_window`), the label-free
  estimate of the headline metric, the window's HTML report and the drift history chart (the `drift` flow:
  pipelines/drift.py).
"""
