"""The UI's words in English and Chinese (`--lang en|zh`). Form fields keep their flag names in both: the form
teaches the command line."""

from __future__ import annotations

from jaxswift.errors import ConfigError

LABELS = {
    "title": ("jaxswift", "jaxswift"),
    "tab_sft": ("SFT", "SFT 微调"),
    "tab_rlhf": ("RLHF", "RLHF 对齐"),
    "tab_grpo": ("GRPO", "GRPO 强化学习"),
    "tab_eval": ("Eval", "评测"),
    "tab_export": ("Export", "导出"),
    "tab_plan": ("Plan", "显存规划"),
    "tab_chat": ("Chat", "对话"),
    "tab_runs": ("Runs", "运行记录"),
    "advanced": ("Advanced", "高级设置"),
    "command": ("Command", "命令"),
    "config_yaml": ("--config YAML", "--config YAML 配置"),
    "launch": ("Launch", "启动"),
    "run_plan": ("Plan", "开始规划"),
    "plan_output": ("Plan output", "规划结果"),
    "launched": ("Launched", "已启动"),
    "invalid": ("Not launched", "未启动"),
    "runs": ("Runs under", "运行目录"),
    "refresh": ("Refresh", "刷新"),
    "stop": ("Stop", "停止"),
    "log": ("Log (tail)", "日志（末尾）"),
    "run": ("Run", "运行"),
    "status": ("Status", "状态"),
    "model": ("Model", "模型"),
    "adapters": ("Adapter folder (optional)", "适配器目录（可选）"),
    "load": ("Load", "加载"),
    "base_url": ("Server", "服务地址"),
    "system": ("System prompt", "系统提示词"),
    "message": ("Message", "消息"),
    "send": ("Send", "发送"),
    "clear": ("Clear", "清空"),
    "temperature": ("temperature", "temperature 温度"),
    "top_p": ("top_p", "top_p"),
    "top_k": ("top_k", "top_k"),
    "max_tokens": ("max_tokens", "max_tokens 最大生成长度"),
    "seed": ("seed (-1: random)", "seed 随机种子（-1：随机）"),
    "no_model": ("No model loaded: load one first.", "尚未加载模型：请先加载。"),
    "loaded": ("Loaded", "已加载"),
    "chat_title": ("Chat with", "对话："),
}
LANGS = ("en", "zh")


def labels(lang: str) -> dict[str, str]:
    if lang not in LANGS:
        raise ConfigError(f"--lang {lang!r}: expected one of {' | '.join(LANGS)}")
    index = LANGS.index(lang)
    return {key: pair[index] for key, pair in LABELS.items()}
