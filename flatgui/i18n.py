"""English and Chinese UI strings. ``t(key, lang)`` falls back to English, then to the key itself.

Core's progress events (core.events) are here as ``event_<key>``: English from core's catalogue, Chinese from
EVENTS_ZH below, with the same parameter names (tests/test_event_catalogue.py checks both)."""
from __future__ import annotations

from core.events import EVENTS

LANGS = {"en": "English", "zh": "中文"}
DEFAULT_LANG = "en"

STRINGS: dict[str, dict[str, str]] = {
    # header
    "title": {"en": "# FlatQuant Studio\nW4A4 post-training quantization with learned affine transforms (FlatQuant). "
                    "Everything runs locally.",
              "zh": "# FlatQuant Studio\n基于可学习仿射变换（FlatQuant）的 W4A4 训练后量化。全部在本地运行。"},
    "language": {"en": "Language", "zh": "语言"},
    "tab_model": {"en": "Model & config", "zh": "模型与配置"},
    "tab_calibrate": {"en": "Calibrate", "zh": "校准"},
    "tab_compare": {"en": "Compare", "zh": "对比"},
    "tab_artifacts": {"en": "Artifacts", "zh": "产物下载"},
    # model & config
    "model_path": {"en": "Model path", "zh": "模型路径"},
    "model_path_info": {"en": "A local Hugging Face folder (LlamaForCausalLM or Qwen3ForCausalLM), or 'smollm2' "
                                  "for the embedded SmolLM2-135M-Instruct.",
                        "zh": "本地 Hugging Face 模型目录（LlamaForCausalLM 或 Qwen3ForCausalLM），"
                              "或填 'smollm2' 使用内置的 SmolLM2-135M-Instruct。"},
    "rescan": {"en": "Rescan local models", "zh": "重新扫描本地模型"},
    "device": {"en": "Device", "zh": "设备"},
    "device_info": {"en": "auto = Ascend NPU if torch_npu is installed, else CUDA, else CPU.",
                    "zh": "auto：有 torch_npu 时用昇腾 NPU，否则 CUDA，否则 CPU。"},
    "skip_layers": {"en": "skip_layers", "zh": "跳过的层 (skip_layers)"},
    "skip_layers_info": {
        "en": "Comma-separated. A linear layer stays in full precision when an entry equals its name or appears "
              "anywhere inside it (substring rule): 'lm_head' skips the output head, 'down_proj' skips every MLP "
              "down projection, 'layers.0.' skips all of layer 0. Each entry needs a letter or digit. Without "
              "'lm_head' the output head is quantized int8 (weights and activations).",
        "zh": "逗号分隔。某个线性层的名字等于某一项、或包含某一项（子串规则）时，该层保持全精度："
              "'lm_head' 跳过输出头，'down_proj' 跳过所有 MLP 的下投影，'layers.0.' 跳过第 0 层全部。"
              "每一项至少要有一个字母或数字。不含 'lm_head' 时输出头量化为 int8（权重与激活）。"},
    "w_bits": {"en": "Weight bits", "zh": "权重位数"},
    "a_bits": {"en": "Activation bits", "zh": "激活位数"},
    "use_down_quant": {"en": "Quantize down_proj (use_down_quant)", "zh": "量化 down_proj (use_down_quant)"},
    "o_proj_quant": {"en": "Quantize o_proj, W4A4 (use_o_quant)", "zh": "量化 o_proj，W4A4 (use_o_quant)"},
    "kv_quant": {"en": "Fake-quantize the KV cache", "zh": "伪量化 KV 缓存"},
    "kv_bits": {"en": "KV-cache bits", "zh": "KV 缓存位数"},
    "epochs": {"en": "Epochs per layer", "zh": "每层训练轮数"},
    "nsamples": {"en": "Calibration samples", "zh": "校准样本数"},
    "seqlen": {"en": "Sequence length", "zh": "序列长度"},
    "flat_lr": {"en": "Learning rate (flat_lr)", "zh": "学习率 (flat_lr)"},
    "cali_bsz": {"en": "Calibration batch size", "zh": "校准批大小 (cali_bsz)"},
    "calib_data": {"en": "Calibration data path", "zh": "校准数据路径"},
    "calib_data_info": {"en": "Empty = the default corpus. A .txt/.raw file or a wikitext folder.",
                        "zh": "留空使用默认语料。可填 .txt/.raw 文件或 wikitext 目录。"},
    "quick_limits": {"en": "Quick-run limits", "zh": "快速运行限制"},
    "max_layers": {"en": "Calibrate only the first N layers (0 = all)", "zh": "只校准前 N 层（0 = 全部）"},
    "ppl_windows": {"en": "PPL windows to evaluate (0 = skip PPL)", "zh": "困惑度评估窗口数（0 = 不评估）"},
    "algorithm": {"en": "Algorithm", "zh": "算法"},
    "algorithm_info": {"en": "FlatQuant learns a transform per layer; QuaRot rotates with Hadamard matrices (no "
                             "training); RTN rounds to nearest with no transform.",
                       "zh": "FlatQuant 为每层学习变换；QuaRot 用 Hadamard 矩阵旋转（无需训练）；"
                             "RTN 不做变换，直接四舍五入量化。"},
    "algo_flatquant": {"en": "FlatQuant (learned transforms)", "zh": "FlatQuant（学习的变换）"},
    "algo_quarot": {"en": "QuaRot (Hadamard rotation)", "zh": "QuaRot（Hadamard 旋转）"},
    "algo_rtn": {"en": "RTN (round to nearest)", "zh": "RTN（四舍五入）"},
    "weight_rounding": {"en": "Weight rounding", "zh": "权重舍入"},
    "weight_rounding_info": {"en": "How the folded weights are rounded to int4: RTN, or GPTQ (error-compensating, "
                                   "uses the calibration data; works with every algorithm).",
                             "zh": "折叠后的权重如何舍入到 int4：RTN，或 GPTQ（误差补偿，使用校准数据；"
                                   "可与任一算法搭配）。"},
    "rounding_rtn": {"en": "RTN (round to nearest)", "zh": "RTN（四舍五入）"},
    "rounding_gptq": {"en": "GPTQ", "zh": "GPTQ"},
    "baselines": {"en": "Baselines to compare", "zh": "对比基线"},
    "baselines_info": {"en": "Measured next to the original and the quantized model: perplexity after "
                             "calibration, and every evaluation (perplexity, accuracy) on the Compare tab.",
                       "zh": "与原始模型和量化模型一起评估：校准后的困惑度，以及“对比”页上的每项评估"
                             "（困惑度、准确率）。"},
    "save_settings": {"en": "Save settings (JSON)", "zh": "保存设置 (JSON)"},
    "load_settings": {"en": "Load settings (JSON)", "zh": "加载设置 (JSON)"},
    "settings_file": {"en": "Settings file", "zh": "设置文件"},
    "settings_ok": {"en": "Settings are valid.", "zh": "设置有效。"},
    "cli_preview": {"en": "Equivalent command line", "zh": "等价的命令行"},
    # calibrate
    "start": {"en": "Start calibration", "zh": "开始校准"},
    "cancel": {"en": "Cancel", "zh": "取消"},
    "load_matrices_title": {"en": "Load calibrated matrices instead of calibrating",
                            "zh": "加载已校准的矩阵（跳过校准）"},
    "matrix_upload": {"en": "flat_matrices.pth (upload)", "zh": "flat_matrices.pth（上传）"},
    "matrix_path": {"en": "…or a path on this machine", "zh": "……或本机上的路径"},
    "load_matrices": {"en": "Load matrices", "zh": "加载矩阵"},
    "loss_chart": {"en": "Calibration loss", "zh": "校准损失"},
    "log": {"en": "Log", "zh": "日志"},
    "idle": {"en": "No job yet. Press Start calibration on the Calibrate tab.",
             "zh": "暂无任务。请在“校准”页点击“开始校准”。"},
    "status_running": {"en": "Running", "zh": "运行中"},
    "status_done": {"en": "Finished", "zh": "已完成"},
    "status_failed": {"en": "Failed", "zh": "失败"},
    "status_cancelled": {"en": "Cancelled", "zh": "已取消"},
    "layer_of": {"en": "layer {i} of {n}", "zh": "第 {i} / {n} 层"},
    "epoch_of": {"en": "epoch {i} of {n}", "zh": "第 {i} / {n} 轮"},
    "elapsed": {"en": "elapsed", "zh": "已用时"},
    "eta": {"en": "ETA", "zh": "预计剩余"},
    "loss": {"en": "loss", "zh": "损失"},
    "job_calibrate": {"en": "calibration", "zh": "校准"},
    "job_load_matrices": {"en": "loading matrices", "zh": "加载矩阵"},
    "job_evaluate": {"en": "evaluation", "zh": "评估"},
    "job_generate": {"en": "generation", "zh": "生成"},
    "job_export": {"en": "checkpoint export", "zh": "导出检查点"},
    "stage_load": {"en": "loading", "zh": "加载中"},
    "stage_data": {"en": "calibration data", "zh": "校准数据"},
    "stage_capture": {"en": "capturing layer inputs", "zh": "采集层输入"},
    "stage_calibrate": {"en": "calibrating", "zh": "校准中"},
    "stage_layer_done": {"en": "layer finished", "zh": "本层完成"},
    "stage_warning": {"en": "warning", "zh": "警告"},
    "stage_fold": {"en": "folding", "zh": "融合变换"},
    "stage_ppl": {"en": "perplexity", "zh": "困惑度"},
    "stage_eval": {"en": "evaluation", "zh": "评估"},
    "stage_latency": {"en": "latency", "zh": "延迟"},
    "stage_gen": {"en": "generation", "zh": "生成"},
    "stage_convert": {"en": "converting to int4", "zh": "转换为 int4"},
    "stage_done": {"en": "done", "zh": "完成"},
    "step_of": {"en": "step {i} of {n}", "zh": "第 {i} / {n} 步"},
    "embedded_text": {"en": "Python's bundled documentation text", "zh": "Python 自带的文档文本"},
    "log_cancel": {"en": "cancel requested; stopping after the current step", "zh": "已请求取消，当前步骤后停止"},
    "log_job_end": {"en": "{kind}: {status}", "zh": "{kind}：{status}"},
    "log_job_end_error": {"en": "{kind}: {status}: {error}", "zh": "{kind}：{status}：{error}"},
    "acc_estimate": {"en": "Accuracy: {n} examples × {tasks} tasks × {m} models, about {minutes} min.",
                     "zh": "准确率：{n} 个样本 × {tasks} 项任务 × {m} 个模型，约 {minutes} 分钟。"},
    "acc_estimate_long": {"en": "⚠ Accuracy: {n} examples × {tasks} tasks × {m} models, about {minutes} min; "
                                "lower Examples per task for a quicker look.",
                          "zh": "⚠ 准确率：{n} 个样本 × {tasks} 项任务 × {m} 个模型，约 {minutes} 分钟；"
                                "想快速看结果可减少每项任务样本数。"},
    "cancelled_kept": {"en": "Cancelled; the numbers finished before the cancel are kept.",
                       "zh": "已取消；取消前完成的结果已保留。"},
    "loaded_cell": {"en": "loaded", "zh": "已加载"},
    "gen_stats": {"en": "**{tps} tokens/s** · {n} new tokens in {s} s",
                  "zh": "**{tps} token/秒** · {s} 秒生成 {n} 个新 token"},
    "fake_fallback": {"en": "the fake-quant model answered: real int4 failed ({cause})",
                      "zh": "由伪量化模型生成：真实 int4 失败（{cause}）"},
    "quantized_fallback": {"en": "FlatQuant (fake-quant, real int4 failed: {cause})",
                           "zh": "FlatQuant（伪量化，真实 int4 失败：{cause}）"},
    "loss_rose_layers": {"en": "The loss ended higher than it started in {n} layer(s) ({layers}); the learning rate "
                                "may be too high.",
                         "zh": "{n} 层的损失结束时高于开始时（第 {layers} 层）；学习率可能过高。"},
    "started": {"en": "Started job {id}.", "zh": "任务 {id} 已启动。"},
    "started_elsewhere": {"en": "Started job {id}; its progress shows at the top of the page.",
                          "zh": "任务 {id} 已启动，进度显示在页面顶部。"},
    "cancel_sent": {"en": "Cancel requested; the job stops after the current step.",
                    "zh": "已请求取消，任务将在当前步骤后停止。"},
    "nothing_to_cancel": {"en": "No job is running.", "zh": "当前没有运行中的任务。"},
    "no_matrix": {"en": "Upload a flat_matrices.pth or type its path first.",
                  "zh": "请先上传 flat_matrices.pth 或填写其路径。"},
    # compare
    "prompt": {"en": "Prompt", "zh": "提示词"},
    "default_prompt": {"en": "The capital of France is", "zh": "The capital of France is"},
    "max_new_tokens": {"en": "New tokens", "zh": "生成 token 数"},
    "generate": {"en": "Generate with both models", "zh": "用两个模型生成"},
    "original": {"en": "Original", "zh": "原始模型"},
    "quantized": {"en": "FlatQuant (fake quant)", "zh": "FlatQuant（伪量化）"},
    "rtn": {"en": "RTN baseline", "zh": "RTN 基线"},
    "quarot": {"en": "QuaRot baseline", "zh": "QuaRot 基线"},
    "quantized_real": {"en": "FlatQuant (real int4)", "zh": "FlatQuant（真实 int4）"},
    "need_models": {"en": "No models in memory yet: run a calibration or load matrices first.",
                    "zh": "内存中还没有模型：请先校准或加载矩阵。"},
    "evaluate": {"en": "Run evaluation", "zh": "运行评估"},
    "eval_ppl": {"en": "Perplexity", "zh": "困惑度"},
    "eval_tasks": {"en": "Six-task accuracy", "zh": "六项任务准确率"},
    "eval_latency": {"en": "Latency", "zh": "延迟"},
    "eval_limit": {"en": "Examples per task", "zh": "每项任务样本数"},
    "ppl_chart": {"en": "Perplexity (lower is better)", "zh": "困惑度（越低越好）"},
    "acc_chart": {"en": "Accuracy (higher is better)", "zh": "准确率（越高越好）"},
    "latency_chart": {"en": "Latency and memory", "zh": "延迟与内存"},
    "chart_empty_eval": {"en": "No numbers yet for this run: press Run evaluation.",
                         "zh": "该运行还没有数据：请点击“运行评估”。"},
    "chart_empty_loss": {"en": "The loss of each layer appears here while calibration runs.",
                         "zh": "校准运行时，这里会显示每一层的损失。"},
    "seqlen_n": {"en": "window {n} tokens", "zh": "窗口 {n} 个 token"},
    "ppl_axis": {"en": "perplexity (log scale)", "zh": "困惑度（对数坐标）"},
    "acc_avg": {"en": "average", "zh": "平均"},
    "lat_prefill": {"en": "prefill ms", "zh": "预填充 毫秒"},
    "lat_decode": {"en": "decode ms/token", "zh": "解码 毫秒/token"},
    "lat_tps": {"en": "tokens/s", "zh": "token/秒"},
    "lat_peak": {"en": "peak memory MiB", "zh": "峰值内存 MiB"},
    "lat_weights": {"en": "weights MiB", "zh": "权重 MiB"},
    "loss_per_layer": {"en": "final loss per layer", "zh": "每层最终损失"},
    "loss_per_step": {"en": "current layer, every step", "zh": "当前层的每一步"},
    "axis_layer": {"en": "layer", "zh": "层"},
    "axis_step": {"en": "step", "zh": "步"},
    "runs_table": {"en": "Runs (newest first)", "zh": "历次运行（最新在前）"},
    "run_select": {"en": "Run", "zh": "运行"},
    "col_run": {"en": "run", "zh": "运行"},
    "col_model": {"en": "model", "zh": "模型"},
    "col_wa": {"en": "W/A bits", "zh": "权重/激活位数"},
    "col_skip": {"en": "skipped layers", "zh": "跳过的层"},
    "col_layers": {"en": "layers", "zh": "层数"},
    "col_epochs": {"en": "epochs", "zh": "轮数"},
    "col_nsamples": {"en": "samples", "zh": "样本数"},
    "col_calib_s": {"en": "calibration s", "zh": "校准秒数"},
    "col_ppl_orig": {"en": "PPL original", "zh": "困惑度 原始"},
    "col_ppl_fq": {"en": "PPL FlatQuant", "zh": "困惑度 FlatQuant"},
    "col_ppl_rtn": {"en": "PPL RTN", "zh": "困惑度 RTN"},
    "col_acc_orig": {"en": "accuracy original", "zh": "准确率 原始"},
    "col_acc_fq": {"en": "accuracy FlatQuant", "zh": "准确率 FlatQuant"},
    "col_tps_orig": {"en": "tokens/s original", "zh": "token/秒 原始"},
    "col_tps_fq": {"en": "tokens/s FlatQuant", "zh": "token/秒 FlatQuant"},
    "refresh": {"en": "Refresh", "zh": "刷新"},
    # artifacts
    "artifacts_help": {"en": "Files are served only from the selected run's output folder.",
                       "zh": "只提供所选运行输出目录中的文件。"},
    "dl_matrices": {"en": "Download flat_matrices.pth", "zh": "下载 flat_matrices.pth"},
    "dl_report": {"en": "Download report.json", "zh": "下载 report.json"},
    "dl_checkpoint": {"en": "Download quantized checkpoint (.zip)", "zh": "下载量化检查点 (.zip)"},
    "export": {"en": "Export quantized checkpoint", "zh": "导出量化检查点"},
    "export_ascend": {"en": "Export for vllm-ascend (W4A4_FLATQUANT_DYNAMIC)",
                      "zh": "导出 vllm-ascend 格式 (W4A4_FLATQUANT_DYNAMIC)"},
    "dl_ascend": {"en": "Download vllm-ascend folder (.zip)", "zh": "下载 vllm-ascend 目录 (.zip)"},
    "run_files": {"en": "All files of this run", "zh": "本次运行的全部文件"},
    "report": {"en": "report.json", "zh": "report.json"},
    "no_runs": {"en": "No runs yet.", "zh": "还没有运行记录。"},
    # values inside log lines: export formats and the memory estimate's parts (core.memory)
    "export_format_native": {"en": "native", "zh": "原生 int4"},
    "export_format_ascend": {"en": "vllm-ascend", "zh": "vllm-ascend"},
    "mem_runtime": {"en": "runtime", "zh": "运行时"},
    "mem_weights": {"en": "weights", "zh": "权重"},
    "mem_original_copy": {"en": "original_copy", "zh": "原始层副本"},
    "mem_activations": {"en": "activations", "zh": "激活"},
    "mem_layer_fp32": {"en": "layer_fp32", "zh": "fp32 层"},
    "mem_train_batch": {"en": "train_batch", "zh": "训练批"},
    "mem_eval_batch": {"en": "eval_batch", "zh": "评估批"},
}

# Core's progress events in Chinese; the parameters are those of core.events.EVENTS[key].template.
EVENTS_ZH: dict[str, str] = {
    "distributed": "分布式：第 {rank} 个进程，共 {world} 个（{backend}）",
    "memory_estimate": "内存估计：主机 {host_gib:.2f} GiB（{host_parts}）；保留浮点原始模型用于对比",
    "memory_estimate_in_place": "内存估计：主机 {host_gib:.2f} GiB（{host_parts}）；不保留浮点原始模型（先评估，再原地量化）",
    "memory_estimate_device": "内存估计：{device} {device_gib:.2f} GiB（{device_parts}）",
    "load_model": "加载模型 {model_path}（主机内存，{dtype}），各层依次移到 {device}",
    "load_original": "加载 {model_path}",
    "load_matrices": "加载已校准的矩阵 {file_path}",
    "rebuild_quantized": "从 {file_path} 重建量化模型",
    "resuming": "断点续跑：从 {file_path} 恢复了 {n} 层",
    "calib_data": "校准数据：{source}",
    "capture": "采集第 0 层的输入（{n} 个样本）",
    "capture_on_disk": "采集第 0 层的输入（{n} 个样本，激活存放在磁盘 {folder_path}）",
    "forward_to_range": "第 {i}/{n} 层：全精度前向，直到第 {start} 层",
    "layer_step": "第 {i}/{n} 层 第 {epoch}/{epochs} 轮 损失 {loss:.6g}",
    "gptq_layer": "第 {i}/{n} 层：GPTQ 权重舍入",
    "layer_done": "第 {i}/{n} 层完成，损失 {first:.4g} → {last:.4g}（{change}）",
    "layer_restored": "第 {i}/{n} 层从断点文件恢复",
    "loss_rose": "第 {i} 层的损失从 {first:.4g} 升到 {last:.4g}（{change}），学习率 (flat_lr) 可能过高",
    "saved": "已保存 {file_path}",
    "ppl_start": "计算{model}的困惑度（窗口 {seqlen}）",
    "ppl_streaming": "困惑度 {model}：逐层把解码层送到 {device}",
    "ppl_window": "困惑度 {model} 窗口 {start}/{n}",
    "ppl_value": "困惑度 {model}：{value:.3f}",
    "ppl_value_seqlen": "困惑度 {model}（窗口 {seqlen}）：{value:.3f}",
    "acc_start": "lm-eval 评估{model}：{tasks}",
    "acc_start_limit": "lm-eval 评估{model}：{tasks}（每项 {limit} 个样本）",
    "acc_requests": "lm-eval 评估{model}：{done}/{total} 个请求",
    "acc_value": "{model} 准确率：{acc}",
    "latency_timing": "交替计时 {models}（重复 {repeats} 次）",
    "generate": "用{model}生成（最多 {max_new_tokens} 个新 token）",
    "generate_streaming": "用{model}生成（最多 {max_new_tokens} 个新 token），逐层送到 {device}",
    "eval_done": "评估完成",
    "real_int4_failed": "真实 int4 转换失败（{cause}）；改由伪量化模型生成",
    "models_on_device": "模型已移到 {device}（{gib:.2f} GiB）",
    "models_on_host": "模型留在主机内存（{gib:.2f} GiB 放不进 {device}）；评估时逐层把解码层送到设备",
    "report_written": "报告已写入 {file_path}",
    "export_start": "导出 {format} 格式的 W4A4 目录到 {folder_path}",
    "export_not_float": "注意：本次运行对 {parts} 的量化不在导出的模型中（vllm-ascend 的 W4A4 FlatQuant 方法不支持）："
                        "以浮点 (FLOAT) 在原始基下导出。",
    "export_done": "{format} 导出已写入 {folder_path}，并打包为 {zip_path}",
}
STRINGS.update({f"event_{key}": {"en": kind.template, "zh": EVENTS_ZH.get(key, "")} for key, kind in EVENTS.items()})


def t(key: str, lang: str = DEFAULT_LANG, **fmt) -> str:
    entry = STRINGS.get(key)
    text = key if entry is None else entry.get(lang) or entry.get(DEFAULT_LANG, key)
    return text.format(**fmt) if fmt else text


def lang_code(value: str | None) -> str:
    """The language radio shows names ('English', '中文'); handlers work with codes."""
    for code, name in LANGS.items():
        if value in (code, name):
            return code
    return DEFAULT_LANG
