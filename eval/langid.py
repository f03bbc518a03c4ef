"""Which language is a text written in? A script-based identifier, no model, no dependencies.

The languages this project measures (English, Thai, Traditional and Simplified Chinese) are told
apart by their writing systems, so counting letters per Unicode script answers nearly every case:

    Thai letters            -> "th"
    Han characters          -> "zh-Hant" / "zh-Hans" / "zh" (see below)
    Han + kana              -> "ja"     (Japanese mixes Han with kana; Chinese never uses kana)
    Hangul                  -> "ko"
    Latin letters           -> "en", or "latin" for another Latin-script language (below)
    Cyrillic, Arabic, ...   -> the script name ("cyrillic", ...)
    no letters at all       -> "unknown"

Digits, punctuation, spaces and emoji count for nothing. A Han character carries about as much
text as three Latin letters (a Chinese word is ~1.5 characters, an English one ~5 letters), so
CJK characters weigh 3 when the dominant script is chosen; otherwise an all-Chinese answer that
quotes one English product name could be called English.

English versus other Latin-script languages
-------------------------------------------
Script cannot tell English from French, and a small chat model trained on non-English text does
answer English questions in French ("What is the capital of France?" -> "L'Étoile, la
Marseillaise, ..."). So Latin-script text is English unless it reads as another language: its
words are compared with two hand-written lists of frequent function words, English ones and
those of French, Spanish, Portuguese, Italian, German and Dutch that are not also English words
(ambiguous ones such as "a", "in", "die", "son", "no", "per", "on", "van", "pour" are in neither). Each
letter with a diacritic English does not use (é, ñ, ü, ß, ...) counts a third of a foreign word,
since English loans (café, naïve) have few. Text with more foreign evidence than English words
is "latin"; text with neither (a bare name, "Paris.") stays "en".

Traditional versus Simplified Chinese
-------------------------------------
Both scripts share most characters; they differ on about 2,000 that the 1956/1964 simplification
(the "Table of Simplified Characters", 簡化字總表) changed. `_PAIRS` below lists ~530 frequent ones
as simplified/traditional pairs, written for this project from that table.
Pairs were left out when either form is also in ordinary use on the other side, because those
would vote for the wrong script: e.g. 后/後 (后 "queen" is Traditional too), 里/裡, 面/麵, 干/乾,
只/隻, 台/臺, 着/著 (著 "famous" is Simplified too), 于/於, 准/準, 几/幾, 腊/臘 (腊味 in Hong Kong
text), and 强/強, 温/溫, 黄/黃 (glyph variants that Hong Kong Traditional text uses).
A text is Traditional when it has more traditional-only than simplified-only characters, and the
reverse; a tie (typically no distinguishing character at all, e.g. "你好") gives plain "zh".
The table is checked against real text in tests/test_eval.py: the 1,000 Taiwan Wikipedia
paragraphs of DRCD hold one simplified-only character among 385,886 Han characters (a typo, 明目張胆),
and 796 of the 800 Traditional PUD sentences come out zh-Hant (the other 4 are plain "zh").
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# simplified + traditional, one pair per word. Grouped roughly by radical for proofreading.
_PAIRS = """
这這 个個 们們 来來 时時 为為 说說 国國 会會 对對 过過 发發 还還 学學 经經 长長 现現 动動 开開
没沒 实實 样樣 进進 种種 关關 机機 点點 从從 两兩 问問 应應 体體 电電 门門 间間 东東 车車 书書
见見 话話 让讓 写寫 听聽 买買 卖賣 头頭 岁歲 钱錢 员員 师師 产產 业業 气氣 万萬 与與 场場 认認
题題 论論 无無 总總 条條 记記 设設 级級 区區 华華 军軍 边邊 报報 计計 务務 导導 结結 众眾 亲親
战戰 识識 议議 变變 传傳 达達 运運 选選 历歷 层層 广廣 单單 举舉 权權 将將 组組 织織 统統 际際
许許 义義 须須 该該 压壓 约約 术術 极極 积積 标標 价價 览覽 么麼
语語 读讀 请請 谁誰 课課 词詞 试試 访訪 证證 评評 译譯 调調 谈談 详詳 误誤 诉訴 讲講 谢謝 诗詩
训訓 讯訊 订訂 讨討 诚誠 谓謂 谋謀 谱譜 谊誼 谣謠 谨謹 辞辭 辩辯
铁鐵 银銀 钟鐘 针針 错錯 锁鎖 镜鏡 钢鋼 销銷 锋鋒 链鏈 铜銅 铅鉛 锅鍋
闻聞 闭閉 阅閱 闹鬧 阀閥 阁閣 闪閃 闯闖
给給 红紅 线線 纸紙 练練 终終 绍紹 继繼 续續 细細 绿綠 纪紀 维維 网網 绝絕 编編 纳納 纯純 绩績
纤纖 缩縮
贝貝 费費 货貨 资資 贵貴 贸貿 购購 质質 责責 财財 贫貧 败敗 账賬 赛賽 赞贊 贡貢 负負 贷貸 贺賀
贼賊
轮輪 转轉 软軟 较較 辆輛 输輸 轻輕 载載 辑輯 连連 阵陣 库庫 轰轟
马馬 吗嗎 妈媽 骑騎 验驗 驾駕 驻駐
饭飯 饮飲 馆館 饿餓 饱飽
观觀 视視 规規 觉覺
页頁 顺順 顾顧 领領 预預 额額 颜顏 类類 项項 顶頂 频頻
鸟鳥 鸡雞 鸣鳴 鹅鵝 鱼魚 鲜鮮
乐樂 远遠 迟遲 递遞 逊遜 张張 帐帳 队隊 阶階 陈陳 隶隸
专專 丛叢 临臨 丽麗 乌烏 乡鄉 习習 亩畝 亿億 仪儀 优優 伤傷 伦倫 伟偉 侧側 侨僑 俭儉 债債 倾傾
儿兒 党黨 兰蘭 兴興 养養 兽獸 册冊 农農 冯馮 决決 况況 净淨 减減 凤鳳 处處 击擊 刘劉 则則 刚剛
创創 删刪 别別 剧劇 劝勸 办辦 劳勞 势勢 医醫 卫衛 厅廳 厂廠 县縣 参參 双雙 叹嘆 启啟 吴吳 响響
园園 围圍 图圖 团團 圣聖 块塊 坚堅 坏壞 声聲 壳殼 备備 复復 夺奪 奋奮 妇婦 孙孫 宁寧 宝寶 宪憲
宽寬 审審 寻尋 尔爾 尘塵 尝嘗 属屬 岛島 岭嶺 带帶 帮幫 庆慶 废廢 异異 弃棄 弹彈 归歸 当當 录錄
彻徹 径徑 忆憶 怀懷 态態 恋戀 恶惡 悦悅 惊驚 惯慣 戏戲 扩擴 扫掃 执執 扬揚 护護 担擔 拥擁 择擇
挂掛 换換 损損 摄攝 数數 断斷 旧舊 显顯 晓曉 暂暫 杀殺 杂雜 构構 枪槍 树樹 桥橋 档檔 检檢 楼樓
欢歡 欧歐 歼殲 残殘 毕畢 汉漢 汤湯 沟溝 泽澤 洁潔 浅淺 测測 济濟 浓濃 涨漲 湾灣 满滿 滥濫 潜潛
灭滅 灯燈 灵靈 炼煉 热熱 爱愛 爷爺 牵牽 状狀 独獨 狮獅 猎獵 献獻 环環 画畫 畅暢 疗療 离離 称稱
稳穩 穷窮 竞競 笔筆 节節 简簡 签簽 粮糧 紧緊 罗羅 罚罰 职職 联聯 肃肅 脑腦 脸臉 舰艦 艺藝 苏蘇
药藥 获獲 营營 虽雖 补補 装裝 触觸 誉譽 迁遷 邮郵 邻鄰 郑鄭 释釋 阳陽 阴陰 陆陸 险險 随隨 隐隱
难難 雾霧 韩韓 风風 飞飛 麦麥 齐齊 龙龍 龟龜 厉厲 虑慮 岂豈 蒋蔣 滚滾 灾災 烦煩 狱獄 猪豬 痒癢
盐鹽 监監 盖蓋 盘盤 矿礦 码碼 确確 礼禮 祸禍 窃竊 竖豎 篮籃 罢罷 翘翹 耸聳 肠腸 肤膚 胆膽 胜勝
胶膠 艰艱 芦蘆 苹蘋 荣榮 荡蕩 莲蓮 萝蘿 蓝藍 虫蟲 虾蝦 蚁蟻 袜襪 袭襲 赵趙 趋趨 跃躍 践踐
酱醬 邓鄧 齿齒 龄齡
"""


def _build_tables(pairs: str) -> tuple[frozenset[str], frozenset[str]]:
    simplified, traditional = set(), set()
    for pair in pairs.split():
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"bad simplified/traditional pair {pair!r}")
        simplified.add(pair[0])
        traditional.add(pair[1])
    if simplified & traditional:
        raise ValueError(f"characters on both sides of the table: {sorted(simplified & traditional)}")
    return frozenset(simplified), frozenset(traditional)


SIMPLIFIED_ONLY, TRADITIONAL_ONLY = _build_tables(_PAIRS)

# Unicode blocks, (first, last, script). Ordered; the first match wins.
_RANGES = [
    (0x0041, 0x005A, "latin"), (0x0061, 0x007A, "latin"), (0x00C0, 0x024F, "latin"),
    (0x1E00, 0x1EFF, "latin"),
    (0x0370, 0x03FF, "greek"), (0x0400, 0x052F, "cyrillic"), (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0900, 0x097F, "devanagari"),
    (0x0E00, 0x0E7F, "thai"), (0x0E80, 0x0EFF, "lao"),
    (0x1100, 0x11FF, "hangul"), (0x3130, 0x318F, "hangul"), (0xAC00, 0xD7AF, "hangul"),
    (0x3040, 0x309F, "kana"), (0x30A0, 0x30FF, "kana"), (0x31F0, 0x31FF, "kana"), (0xFF66, 0xFF9F, "kana"),
    (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"), (0xF900, 0xFAFF, "han"), (0x20000, 0x3134F, "han"),
]
_CJK = {"han", "kana", "hangul"}
CJK_WEIGHT = 3  # one CJK character ~ three Latin letters of content (see module docstring)


def char_script(ch: str) -> str | None:
    """The script of one character, or None for digits, punctuation, spaces, symbols."""
    cp = ord(ch)
    for first, last, script in _RANGES:
        if first <= cp <= last:
            # Latin-1 also holds × and ÷, which are symbols, not letters
            return script if unicodedata.category(ch).startswith("L") or script in ("thai", "lao") else None
    return None


@dataclass
class LangGuess:
    lang: str                                  # en | th | zh-Hant | zh-Hans | zh | ja | ko | <script> | unknown
    script: str | None                         # dominant script, None if no letters
    counts: dict[str, int] = field(default_factory=dict)  # letters per script (unweighted)
    traditional: int = 0                       # traditional-only Han characters seen
    simplified: int = 0                        # simplified-only Han characters seen


def script_counts(text: str) -> Counter:
    """Letters per script in text (unweighted counts)."""
    return Counter(s for s in map(char_script, text) if s is not None)


def chinese_variant(text: str) -> tuple[str, int, int]:
    """-> ("zh-Hant" | "zh-Hans" | "zh", traditional-only count, simplified-only count)."""
    trad = sum(ch in TRADITIONAL_ONLY for ch in text)
    simp = sum(ch in SIMPLIFIED_ONLY for ch in text)
    variant = "zh-Hant" if trad > simp else "zh-Hans" if simp > trad else "zh"
    return variant, trad, simp


def identify(text: str) -> LangGuess:
    """Guess the language of `text` from its scripts (see the module docstring for the rules)."""
    counts = script_counts(text)
    if not counts:
        return LangGuess("unknown", None, {})
    weighted = {s: n * (CJK_WEIGHT if s in _CJK else 1) for s, n in counts.items()}
    # Japanese: kana and Han together count as one writing system, so a Japanese sentence with
    # more kanji than kana is still Japanese. Chinese text has no kana at all; a stray one
    # (e.g. the particle の in a shop name) needs to be more than a tenth of the CJK part.
    cjk = counts.get("han", 0) + counts.get("kana", 0)
    if counts.get("kana", 0) and counts["kana"] >= 0.1 * cjk:
        weighted["kana"] = weighted.get("kana", 0) + weighted.pop("han", 0)
    script = max(weighted, key=lambda s: (weighted[s], s))
    if script == "han":
        lang, trad, simp = chinese_variant(text)
        return LangGuess(lang, script, dict(counts), trad, simp)
    if script == "latin":
        return LangGuess(latin_language(text), script, dict(counts))
    lang = {"thai": "th", "kana": "ja", "hangul": "ko"}.get(script, script)
    return LangGuess(lang, script, dict(counts))


# Frequent function words. FOREIGN: French, Spanish, Portuguese, Italian, German, Dutch words that
# are not English words (see the module docstring); written for this project.
ENGLISH_WORDS = frozenset("""the and is are was were be been of to that this it its for with as at by from or
but not you your we they he she his her them their there what which who will would can could
should have has had do does did if than then these those about into more most also such any all
some one two how when where why because while very just only other our my me i am""".split())
FOREIGN_WORDS = frozenset("""le la les des du une est et que qui dans sur avec au aux ce cette ces il
elle ils elles sont nous vous leur mais ou où été être fait très comme tout aussi
el los las del por una es y lo su sus para como más pero muy está fue entre sobre
uma os não para mais ao das dos pelo pela também são foi
il di che è gli della delle degli sono alla nel nella anche più questo questa
der das und ist nicht mit ein eine dem zu von auf für sich auch wird sind nach bei wie
oder aus einer eines noch nur durch über het een zijn niet voor ook maar naar wordt""".split())
# Left out as English words too: com (".com"), son, sin, con, den, van, met, pour, plus, non, um.
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_ENGLISH_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyz")


def latin_language(text: str) -> str:
    """Latin-script text -> "en", or "latin" when it reads as another language (module docstring)."""
    words = [w.split("'")[-1] for w in _WORD.findall(text.lower())]  # l'étoile -> étoile, d'un -> un
    english = sum(w in ENGLISH_WORDS for w in words)
    foreign = sum(w in FOREIGN_WORDS for w in words)
    marked = sum(char_script(c) == "latin" and c not in _ENGLISH_LETTERS for c in text.lower())
    evidence = foreign + marked / 3
    return "latin" if evidence > english and evidence >= 1 else "en"


def language_shares(texts: list[str]) -> dict[str, float]:
    """Share of texts identified as each language, e.g. {"zh-Hant": 0.9, "en": 0.1}; sums to 1."""
    if not texts:
        return {}
    tally = Counter(identify(t).lang for t in texts)
    return {lang: n / len(texts) for lang, n in sorted(tally.items(), key=lambda kv: -kv[1])}
