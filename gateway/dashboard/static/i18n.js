// The dashboard's words, in Chinese (the default) and English. Service, group and provider names
// come from the catalogue (name_zh / name_en); everything else is here.
"use strict";

const WORDS = {
  zh: {
    title: "社区网关", live_hint: "实时数据流", online: "实时", offline: "未连接", logout: "退出",
    login_title: "请输入访问令牌", login_hint: "令牌由安装人员设置（cgw demo 启动时会打印）。", login: "登录",
    bad_token: "令牌无效或已过期。", forbidden: "当前令牌无权执行此操作（需要 operator 角色）。",
    tab_overview: "社区概览", tab_alarms: "实时告警", tab_telemetry: "监测曲线", tab_requests: "服务工单",
    tab_needs: "需求热点", tab_evaluation: "服务评价",
    devices: "设备总数", devices_online: "在线设备", open_alarms_card: "未确认告警", open_requests: "进行中工单",
    buildings: "楼栋与楼层（设备在线情况）", building: "楼栋", floor: "楼层", whole_building: "楼栋公共",
    building_n: "{n} 号楼", station: "服务站",
    open_alarms: "未确认告警", no_alarms: "没有未确认的告警。", time: "时间", severity: "级别", device: "设备",
    alarm_type: "类型", message_col: "说明", ack: "确认", acked: "已确认",
    warning: "警告", critical: "严重", info: "提示",
    metric: "指标", range: "时间范围", last_1h: "最近 1 小时", last_6h: "最近 6 小时", last_24h: "最近 24 小时",
    no_data: "该时间范围内没有数据。",
    heatmap: "需求热力图（楼栋 × 服务类别，近 7 天）", needs_list: "需求清单（按优先级排序）",
    why_text: "{households}，{signals}，优先级 {priority}，已等待 {days}",
    households_n: "{n} 户", signals_n: "{n} 个传感信号", days_n: "{n} 天", votes_n: "{n} 票",
    service: "服务", provider: "服务提供方", households: "户数", score: "得分", why: "依据",
    proposals: "居民议事提案与投票", no_proposals: "暂无提案。", votes: "票", approval: "赞成率",
    result_open: "投票中", result_passed: "已通过", result_rejected: "未通过",
    by_service: "按服务", by_provider: "按服务提供方", requests_col: "工单数", completion: "完成率",
    on_time: "按时率", satisfaction: "满意度（均分）", complaints: "投诉解决率", median_hours: "完成用时中位数（小时）",
    more: "另有 {n} 条",
    kind_air_quality: "空气质量", kind_smoke_detector: "烟感", kind_water_leak: "漏水检测",
    kind_emergency_button: "紧急呼叫", kind_door_access: "门禁", kind_elevator: "电梯", kind_energy_meter: "电表",
    kind_water_meter: "水表", kind_footfall_counter: "客流计数", kind_service_terminal: "自助服务终端",
    kind_generic: "通用设备",
    state_submitted: "已提交", state_triaged: "已受理", state_planned: "已计划", state_assigned: "已派单",
    state_in_service: "服务中", state_completed: "已完成", state_evaluated: "已评价", state_closed: "已关闭",
    state_rejected: "已驳回", state_merged: "已合并", state_reopened: "已重开",
  },
  en: {
    title: "Community gateway", live_hint: "Live stream", online: "Live", offline: "Not connected", logout: "Sign out",
    login_title: "Enter an access token", login_hint: "Tokens are set by the installer (cgw demo prints them).",
    login: "Sign in", bad_token: "The token is unknown or expired.",
    forbidden: "This token may not do that (the operator role is needed).",
    tab_overview: "Overview", tab_alarms: "Live alarms", tab_telemetry: "Telemetry", tab_requests: "Service requests",
    tab_needs: "Needs and hotspots", tab_evaluation: "Evaluation",
    devices: "Devices", devices_online: "Online", open_alarms_card: "Open alarms", open_requests: "Open requests",
    buildings: "Buildings and floors (device presence)", building: "Building", floor: "Floor",
    whole_building: "Building-wide", building_n: "Building {n}", station: "Service station",
    open_alarms: "Open alarms", no_alarms: "No open alarms.", time: "Time", severity: "Severity", device: "Device",
    alarm_type: "Type", message_col: "Message", ack: "Acknowledge", acked: "Acknowledged",
    warning: "Warning", critical: "Critical", info: "Info",
    metric: "Metric", range: "Range", last_1h: "Last hour", last_6h: "Last 6 hours", last_24h: "Last 24 hours",
    no_data: "No data in this range.",
    heatmap: "Needs heat map (building × service group, last 7 days)", needs_list: "Needs list (ranked)",
    why_text: "{households}, {signals}, priority {priority}, open {days}",
    // Counted words: one form per plural category of the language (Intl.PluralRules).
    households_n: { one: "{n} household", other: "{n} households" },
    signals_n: { one: "{n} sensor signal", other: "{n} sensor signals" },
    days_n: { one: "{n} day", other: "{n} days" },
    votes_n: { one: "{n} vote", other: "{n} votes" },
    service: "Service", provider: "Provider", households: "Households", score: "Score", why: "Why",
    proposals: "Residents' council proposals and votes", no_proposals: "No proposals yet.", votes: "votes",
    approval: "Approval", result_open: "Voting", result_passed: "Passed", result_rejected: "Rejected",
    by_service: "By service", by_provider: "By provider", requests_col: "Requests", completion: "Completed",
    on_time: "On time", satisfaction: "Satisfaction (mean)", complaints: "Complaints resolved",
    median_hours: "Median hours to complete", more: "{n} more",
    kind_air_quality: "Air quality", kind_smoke_detector: "Smoke detector", kind_water_leak: "Water leak",
    kind_emergency_button: "Emergency button", kind_door_access: "Door access", kind_elevator: "Elevator",
    kind_energy_meter: "Energy meter", kind_water_meter: "Water meter", kind_footfall_counter: "Footfall counter",
    kind_service_terminal: "Service terminal", kind_generic: "Generic device",
    state_submitted: "Submitted", state_triaged: "Triaged", state_planned: "Planned", state_assigned: "Assigned",
    state_in_service: "In service", state_completed: "Completed", state_evaluated: "Evaluated", state_closed: "Closed",
    state_rejected: "Rejected", state_merged: "Merged", state_reopened: "Reopened",
  },
};

const LANGS = ["zh", "en"];

const I18N = {
  lang: localStorage.getItem("cgw.lang") === "en" ? "en" : "zh",

  t(key, vars) {
    let text = WORDS[this.lang][key] ?? WORDS.zh[key] ?? key;
    for (const [name, value] of Object.entries(vars || {})) text = text.replace(`{${name}}`, value);
    return text;
  },

  // "1 household", "2 households": `n` shown with `digits` decimals, in the form its plural
  // category takes in the current language ("1.0 days": a decimal one is not singular).
  count(key, n, digits = 0) {
    const forms = WORDS[this.lang][key] ?? WORDS.zh[key];
    const shown = Number(n).toFixed(digits);
    if (typeof forms === "string") return forms.replace("{n}", shown);
    const rules = new Intl.PluralRules(this.lang, { minimumFractionDigits: digits });
    return (forms[rules.select(Number(shown))] ?? forms.other).replace("{n}", shown);
  },

  set(lang) {
    if (!LANGS.includes(lang)) return;
    this.lang = lang;
    localStorage.setItem("cgw.lang", lang);
  },

  // A catalogue entry's name in the current language.
  name(entry, fallback) {
    if (!entry) return fallback;
    return (this.lang === "en" ? entry.name_en : entry.name_zh) || entry.name_en || fallback;
  },

  apply(root = document) {
    document.documentElement.lang = this.lang === "en" ? "en" : "zh-CN";
    for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = this.t(el.dataset.i18n);
    for (const el of root.querySelectorAll("[data-i18n-title]")) el.title = this.t(el.dataset.i18nTitle);
  },

  toggle() {
    this.set(this.lang === "en" ? "zh" : "en");
  },
};
