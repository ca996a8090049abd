"""The override and exfiltration phrases (and a few persona and "note to the AI" phrases) in other
languages: German, French, Spanish, Portuguese, Italian, Dutch, Polish, Swedish, Danish, Turkish, Greek,
Russian, Japanese, Chinese, Korean and Vietnamese.

The Latin-script languages share one pattern per family: a verb, up to five words that are not "my/our",
then an object ("instructions", "rules", "prompt"); the check wants a qualifier near the object
("previous", "all", "your", "system", "that you received"), so "ignorieren Sie meine vorherige E-Mail"
and "ignore el correo anterior" stay quiet.
"""

from __future__ import annotations

import re

from framework.injection._context import W, after
from framework.injection._engine import Rule, rule

# Multilingual (Latin script: German, French, Spanish, Portuguese, Italian, Dutch, Polish). One union
# per family: a verb, up to four words that are not "my/our", then the object; the check wants a
# qualifier ("previous", "all", "your", "system") near the object, so "ignorieren Sie meine vorherige
# E-Mail" and "ignore el correo anterior" stay quiet.
_ML_MINE = (r"(?:mein\w{0,20}|unser\w{0,20}|mon|ma|mes|notre|nos|mi|mis|nuestr\w{0,20}|meu|minha|meus|minhas|"
            r"noss\w{0,20}|mio|mia|"
            r"miei|mie|nostr\w{0,20}|mijn|onze|ons|mój|moj\w{0,20}|moich|nasz\w{0,20})")
_ML_OVERRIDE_VERB = (
    r"(?:ignorier(?:e|en|t)?|vergiss|vergessen|missacht(?:e|en)?|übergeh(?:e|en)|uebergeh(?:e|en)|"
    r"befolge|befolgen|beachte|beachten|"
    r"ignore[rsz]?|ignorez|oublie[rsz]?|oubliez|(?:ne\s+)?(?:tiens|tenez)\s+pas\s+compte|(?:fais|faites)\s+abstraction|"
    r"ne\s+(?:suis|suivez)\s+(?:plus|pas)|passe[rz]?\s+outre|outrepasse[rz]?|"
    r"ignora[dr]?|ignoren|olvida[dr]?|olvide|olviden|omite|omita|descarta|descarte|haz\s+caso\s+omiso|"
    r"hagan?\s+caso\s+omiso|no\s+sigas|no\s+siga|desobedece|desatiende|"
    r"ignorem|esque[çc]a[m]?|esquece|desconsider(?:e|a|em)|n[ãa]o\s+sig(?:a|as)|desobede[çc]a|"
    r"ignorate|ignori|dimentica|dimenticate|dimentichi|non\s+seguire|non\s+segua|trascura|tralascia|disattendi|"
    r"negeer|negeert|vergeet|volg\s+(?:de\s+)?niet|"
    r"zignoruj(?:cie)?|ignoruj(?:cie)?|zapomnij(?:cie)?|pomi[ńn](?:cie)?|nie\s+(?:stosuj|przestrzegaj|słuchaj|sluchaj)|"
    r"ignorera|glöm|strunta\s+i|bortse\s+fr[åa]n|ignorer|glem|se\s+bort\s+fra)")
_ML_OBJECT = (r"(?:anweisung\w{0,20}|instruktion\w{0,20}|regeln|vorgaben|befehle|richtlinien|systemprompt\w{0,20}|"
              r"system-prompt\w{0,20}|"
              r"systemanweisung\w{0,20}|instructions?|consignes?|r[èe]gles|directives|invite\s+syst[èe]me|"
              r"instrucciones|instrucci[óo]n|reglas|indicaciones|directrices|[óo]rdenes|consignas|"
              r"instru[çc](?:[õo]es|[ãa]o)|regras|diretrizes|orienta[çc][õo]es|ordens|comandos|"
              r"istruzioni|regole|direttive|indicazioni|ordini|comandi|"
              r"instructies|instructie|regels|richtlijnen|opdrachten|aanwijzingen|systeemprompt|"
              r"instrukcj\w{0,20}|polece\w{0,20}|regu[łl]\w{0,20}|zasad\w{0,20}|wytyczn\w{0,20}|prompt\w{0,20}|instruktion\w{0,20}|regler\w{0,20}|"
              r"anvisning\w{0,20}|direktiv\w{0,20})")
# Needles: the verb stems of _ML_OVERRIDE_VERB and _ML_EXFIL_VERB (a match starts with one).
_ML_OVERRIDE_NEEDLES = ("ignor|vergiss|vergessen|missacht|übergeh|uebergeh|befolge|beachte|oubli|tiens|tenez|"
                        "abstraction|suis|suivez|outre|olvid|omit|descart|omiso|sigas|siga|desobedec|desatiend|esqueç|esquec|"
                        "desconsider|dimentic|seguire|segua|trascura|tralascia|disattendi|negeer|vergeet|volg|"
                        "zignoruj|ignoruj|zapomnij|pomiń|pomin|stosuj|przestrzegaj|słuchaj|sluchaj|glöm|strunta|bortse|"
                        "glem|bort")
_ML_EXFIL_NEEDLES = ("zeig|gib|geben|verrat|nenne|wiederhol|druck|offenbar|enthüll|enthuell|montre|affiche|révèle|"
                     "revele|révél|donne|répète|repete|répét|imprime|dis-moi|dites-moi|écris|ecris|muéstr|muestr|"
                     "revela|dime|dígame|digame|repite|enséñ|enseñ|escribe|mostr|revele|diga|imprima|repita|exib|"
                     "rivela|dimmi|stampa|ripeti|scrivi|visualizza|toon|laat|geef|onthul|herhaal|vertel|poka|"
                     "ujawnij|wypisz|podaj|powt|wyświetl|wyswietl|zdradź|zdradz")

_ML_STRONG = re.compile(
    r"\b(?:vorherig\w{0,20}|bisherig\w{0,20}|obig\w{0,20}|vorig\w{0,20}|fr(?:ü|ue)her\w{0,20}|vorangegangen\w{0,20}|urspr(?:ü|ue)nglich\w{0,20}|alle\w{0,20}|"
    r"s(?:ä|ae)mtlich\w{0,20}|deine\w{0,20}|ihre\w{0,20}|system\w{0,20}|zuvor|"
    r"pr[ée]c[ée]dent\w{0,20}|ant[ée]rieur\w{0,20}|ci-dessus|toutes|tous|tes|vos|ton|votre|initial\w{0,20}|syst[èe]me|"
    r"anteriores|previas|precedentes|arriba|todas|todos|tus|sus|tu|su|iniciales|originales|sistema|"
    r"pr[ée]vias|acima|suas|seus|tuas|teus|iniciais|originais|"
    r"precedenti|sopra|tutte|tutti|tue|tuoi|vostre|vostri|iniziali|originali|"
    r"vorige|voorgaande|eerdere|bovenstaande|je|jouw|uw|oorspronkelijke|systeem\w{0,20}|"
    r"poprzedni\w{0,20}|wcze[śs]niejsz\w{0,20}|powy[żz]sz\w{0,20}|wszystki\w{0,20}|swoje|swoich|twoje|twoich|systemow\w{0,20}|"
    r"pocz[ąa]tkow\w{0,20}|alla|tidigare|föregående|dina|ovanstående|alle|tidligere|forrige|dine|ovenstående|"
    # "the guidelines you received": the qualifier that points at the reader's own instructions
    r"que\s+(?:tu\s+|você\s+|voce\s+|usted\s+)?(?:recebeu|recebeste|recibiste|recibió|recibio|has\s+recibido|"
    r"te\s+dieron|te\s+deram)|qu['’]on\s+t['’]a\s+donn\w{0,20}|que\s+(?:tu\s+as|vous\s+avez)\s+re[çc]u\w{0,20}|"
    r"die\s+(?:du|sie)\s+(?:bekommen|erhalten)|che\s+hai\s+ricevuto|die\s+je\s+(?:hebt\s+)?(?:gekregen|ontvangen)|"
    r"które\s+otrzyma\w{0,20})\b")


_ML_MINE_WORD = re.compile(rf"\b{_ML_MINE}\b")


def _ml_override_check(m: re.Match[str], text: str) -> bool:
    window = text[m.start():m.end() + 48].rsplit(None, 1)[0]  # whole words only: "mes" of "messaggio" is not "my"
    if _ML_MINE_WORD.search(window) or _ML_STRONG.search(window) is None:
        return False
    # "beachte/befolge" (observe/follow) override only when negated: "beachte keine deiner Regeln mehr"
    negated = re.search(r"\b(?:nicht|kein\w{0,20})\b", window) is not None
    return negated or not m.group(0).startswith(("beacht", "befolg"))


_ML_EXFIL_VERB = (r"(?:zeig(?:e|en)?|gib|geben\s+sie|verrat(?:e|en)?|nenne|nennen\s+sie|wiederhole|wiederholen\s+sie|"
                  r"druck(?:e|en)?|offenbare|enth(?:ü|ue)lle|"
                  r"montre[rz]?|affiche[rz]?|r[ée]v[èée]le[rz]?|donne[rz]?|r[ée]p[èée]te[rz]?|imprime[rz]?|"
                  r"dis-moi|dites-moi|[ée]cris|"
                  r"mu[ée]strame|muestra|revela(?:me)?|dime|d[íi]game|imprime|repite|ens[ée][ñn]ame|escribe|"
                  r"mostre|mostra(?:mi)?|revele|diga|imprima|repita|exib[ae]|me\s+mostre|me\s+diga|"
                  r"rivela(?:mi)?|dimmi|stampa|ripeti|scrivi|visualizza|"
                  r"toon|laat\s+(?:me\s+)?zien|geef|onthul|herhaal|vertel(?:\s+me)?|"
                  r"poka[żz]|ujawnij|wypisz|podaj|powt[óo]rz|wy[śs]wietl|zdrad[źz])")
_ML_EXFIL_OBJECT = (r"(?:system-?prompt\w{0,20}|systemanweisung\w{0,20}|systemnachricht|"
                    r"prompt\s+(?:syst[èe]me|del\s+sistema|"
                    r"do\s+sistema|di\s+sistema|systemowy\w{0,20})|invite\s+syst[èe]me|systeemprompt|"
                    r"(?:instructions?|consignes|instrucciones|instru[çc][õo]es|istruzioni|instructies|instrukcj\w{0,20}|"
                    r"anweisungen|regeln|r[èe]gles|reglas|regras|regole|regels|zasady))")
_ML_YOUR = re.compile(r"\b(?:deine\w{0,20}|ihre\w{0,20}|tes|vos|ton|votre|tus|sus|tu|su|suas|seus|tuas|teus|tue|"
                      r"tuoi|sue|"
                      r"vostre|je|jouw|uw|swoje|twoje|sw[óo]j|tw[óo]j|initial\w{0,20}|original\w{0,20}|vollst(?:ä|ae)ndig\w{0,20}|"
                      r"complet\w{0,20}|completo|completa|intero|volledige|ca[łl]y|ca[łl]e|pe[łl]n\w{0,20})\b")
_ML_PREP_AFTER = re.compile(r"\s*(?:f(?:ü|ue)r|zur|zum|zu|pour|sur|para|sobre|per|su|voor|over|dla|do|na|o)\b")


def _ml_exfil_check(m: re.Match[str], text: str) -> bool:
    if "system" in m["obj"] or "syst" in m["obj"] or "prompt" in m["obj"]:
        return True
    return _ML_YOUR.search(m["mid"]) is not None and not after(text, m.end(), _ML_PREP_AFTER)


def _russian_override_check(m: re.Match[str], text: str) -> bool:
    after = text[m.end():m.end() + 90]
    return (_RU_OBJECT.match(after) is not None
            and re.search(r"предыдущ|прежн|вышеуказанн|вышеизложенн|все|свои|твои|ваши|системн|изначальн|исходн|эти",
                          after) is not None)


_RU_OBJECT = re.compile(r"\s+(?:(?!мо[йеияю]|наш)\w{1,20}\s+){0,3}?(?:инструкци|указани|правил|команд|промпт|"
                        r"установк|директив|предписани)")


def _chinese_override_check(m: re.Match[str], text: str) -> bool:
    """A qualifier (previous, all, your, system, received) between the verb and the object: "忽略我之前的邮件" has
    no object, "可以忽略这个提示吗" ("can I ignore this warning?") no qualifier."""
    if re.search(r"我|我们|我們", m["q"]):
        return False
    return (re.search(r"之前|以前|先前|上面|上述|前面|以上|此前|所有|全部|一切|原来|原來|原有|最初|你|您|"
                      r"系统|系統|收到", m["q"]) is not None or m["obj"] in ("指令", "提示词", "提示詞"))




RULES: tuple[Rule, ...] = (
    rule("persona", "ahora|partir|bist|maintenant|désormais|dorénavant|agora|você|voce|sei|bent|jesteś|jestes|"
         "теперь|отныне",
         r"(?:(?:a\s+partir\s+de\s+)?ahora\s+eres|du\s+bist\s+(?:jetzt|nun|ab\s+jetzt|ab\s+sofort)|tu\s+es\s+"
         r"(?:maintenant|désormais|dorénavant)|(?:agora\s+)?voc[êe]\s+(?:agora\s+)?é|(?:da\s+)?ora\s+(?:in\s+poi\s+)?sei|"
         r"je\s+bent\s+(?:nu|voortaan|vanaf\s+nu)|jeste[śs]\s+(?:teraz|od\s+teraz)|теперь\s+ты|ты\s+теперь|"
         r"отныне\s+ты)\s+(?:\w{1,20}\s+){0,3}?(?:asistente|assistent\w{0,4}|assistant\w{0,2}|ki|ia|ии|bot|modelo|"
         r"modell|modello|model|dan|hacker|sin\s+(?:restricciones|reglas|filtros|l[íi]mites)|ohne\s+(?:einschr(?:ä|ae)"
         r"nkungen|regeln|filter|grenzen)|sans\s+(?:restrictions?|limites?|filtres?|r[èe]gles)|sem\s+(?:restri[çc][õo]es|"
         r"regras|filtros|limites)|senza\s+(?:restrizioni|limiti|filtri|regole)|zonder\s+(?:beperkingen|regels|"
         r"filters)|bez\s+(?:ogranicze[ńn]|zasad|filtr[óo]w)|без\s+(?:ограничений|правил|фильтров)|"
         r"libre|frei|livre|libero|vrij|wolny|свободн\w{0,3})\b", back=40),
    rule("persona", "你现在是|你現在是|从现在开始|從現在開始|从现在起|從現在起|"
         "あなたは今から|今からあなたは|これからあなたは",
         r"(?:你现在是|你現在是|(?:从|從)现在(?:开始|開始|起)[，,]?你(?:是|就是|将是|將是)|(?:从|從)現在(?:开始|開始|起)[，,]?"
         r"你(?:是|就是)|あなたは今から|今からあなたは|これからあなたは).{0,16}?(?:助手|ai|模型|机器人|機器人|dan|没有限制|"
         r"沒有限制|不受限制|无限制|無限制|アシスタント|制限|ボット|ロボット)", latin=False, back=8),
    rule("address_model", "ki|ia|ии|ai|si|assistent|asistente|assistente|assistant|asystent|ассистент|bot|бот|modell|"
         "modelo|modello|model|моде|нейросет|sprachmodell",
         r"\b(?:hinweis|nachricht|anweisung|notiz|notes?|messages?|instructions?|consignes?|nota|mensaje|"
         r"instrucci[oó]n|aviso|mensagem|instru[çc][ãa]o|messaggio|istruzione|avviso|notitie|bericht|instructie|"
         r"opmerking|uwaga|wiadomo[śs][ćc]|instrukcja|notatka|заметка|сообщение|инструкция|примечание|указание)\s+"
         r"(?:an|f(?:ü|ue)r|à|a|pour|para|ao|per|all[’']|alla|al|voor|aan|dla|do|для)\s*(?:die\s+|das\s+|den\s+|l[’']|"
         r"le\s+|la\s+|el\s+|o\s+|il\s+|de\s+|het\s+)?(?:ki|ia|ии|ai|si|assistent\w{0,4}|asistente|assistente|"
         r"assistant|asystent\w{0,3}|ассистент\w{0,3}|bot\w{0,3}|бот\w{0,3}|modell|modelo|modello|model\w{0,3}|"
         r"моде\w{1,3}|нейросет\w{1,3}|sprachmodell|ki-\w{1,12}|ia\s+\w{1,12})\b", back=80),
    # -- the override and exfiltration phrases in other languages ------------------------------------------------
    rule("override_multilingual", _ML_OVERRIDE_NEEDLES,
         rf"\b(?:{_ML_OVERRIDE_VERB})\s+(?:(?!{_ML_MINE}\b){W}\s+){{0,5}}?{_ML_OBJECT}", _ml_override_check, back=24),
    rule("override_multilingual", "alles|tout|todo|tudo|tutto|wszystko",
         r"\b(?:vergiss|vergessen\s+sie|oublie[z]?|olvida|esque[çc]a|dimentica|vergeet|zapomnij)\s+(?:alles|tout|todo|"
         r"tudo|tutto|wszystko)\b\s*,?\s*(?:was|ce\s+qu|lo\s+que|o\s+que|quello\s+che|wat|co)\b", back=40),
    rule("override_multilingual", "игнорир|забудь|внимания|следуй|отбрось|пренебреги",
         r"(?:про)?игнорир(?:уй|уйте|овать)|забудь(?:те)?|не\s+обращай(?:те)?\s+внимания\s+на|не\s+следуй(?:те)?|"
         r"отбрось(?:те)?|пренебреги(?:те)?", _russian_override_check, latin=False, back=24),
    rule("override_multilingual", "無視|忘れ|破棄",
         r"(?:以前|前|上記|上|これまで|今まで|先ほど|先程|最初|全て|すべて|あなた)の?(?:全ての|すべての)?(?:指示|命令|指令|"
         r"ルール|規則|プロンプト|制約|ガイドライン|設定)(?:を|は)?(?:すべて|全て)?(?:無視|忘れ|破棄)|"
         r"(?:指示|命令|指令|プロンプト|システムプロンプト|制約)を(?:すべて|全て)?(?:無視|忘れ)",
         latin=False, back=40),
    rule("override_multilingual", "忽略|无视|無視|忽视|忽視|忘记|忘記|忘掉|不要理|不要遵|别管|別管|抛开|拋開|放弃|放棄",
         r"(?:忽略|无视|無視|忽视|忽視|忘记|忘記|忘掉|不要理会|不要理會|不要遵守|不要遵循|别管|別管|抛开|拋開|放弃|放棄)"
         r"(?:掉)?(?P<q>[^，。！？,.!?\n]{0,14}?)"
         r"(?P<obj>指令|指示|提示词|提示詞|说明|說明|规则|規則|提示|命令|设定|設定|约束|約束)",
         _chinese_override_check, latin=False, back=8),
    rule("override_multilingual", "talimat",
         r"(?:önceki|yukarıdaki|tüm|bütün|sana\s+verilen|eski)\s+(?:\w{1,20}\s+){0,2}?talimat\w{0,8}\s+(?:\w{1,20}\s+)?"
         r"(?:yok\s+say|görmezden\s+gel|unut|dikkate\s+alma|umursama)", latin=False, back=60),
    rule("override_multilingual", "αγνό|αγνο|ξέχασ|ξεχάσ",
         r"(?:αγνόησε|αγνοήστε|ξέχασε|ξεχάστε)\s+(?:\w{1,20}\s+){0,3}?(?:οδηγίεσ|οδηγιών|κανόνεσ|εντολέσ)",
         latin=False, back=8),
    rule("override_multilingual", "bỏ qua|phớt lờ|quên|lờ đi",
         r"(?:bỏ\s+qua|phớt\s+lờ|quên|lờ\s+đi)\s+(?:\w{1,12}\s+){0,4}?(?:hướng\s+dẫn|chỉ\s+dẫn|chỉ\s+thị|quy\s+tắc|"
         r"lệnh)", latin=False, back=8),
    rule("override_multilingual", "무시|잊어",
         r"(?:이전|앞|위|기존|모든)의?\s*(?:모든\s*)?(?:지시|지침|명령|규칙|프롬프트|instructions?)(?:을|를|은|는)?\s*"
         r"(?:모두\s*)?(?:무시|잊어)", latin=False, back=40),
    rule("exfiltration_multilingual", _ML_EXFIL_NEEDLES,
         rf"\b{_ML_EXFIL_VERB}(?:-(?:moi|nous|me|mir))?\s+(?P<mid>(?:{W}\s+){{0,3}}?)"
         rf"{_ML_EXFIL_OBJECT.replace('(?:', '(?P<obj>', 1)}", _ml_exfil_check, back=16),
    rule("exfiltration_multilingual",
         "покажи|выведи|раскрой|повтори|напиши|распечатай|скажи|сообщи|перескажи|дай|какой|каков",
         r"(?:покажи|выведи|раскрой|повтори|напиши|распечатай|скажи|сообщи|перескажи|дай)(?:те)?\s+(?:мне\s+)?"
         r"(?:\w{1,20}\s+){0,3}?(?:системн\w{0,20}\s+(?:промпт|подсказк|инструкци|сообщени)\w{0,20}|промпт\w{0,20}|(?:свои|твои|ваши)"
         r"\s+(?:\w{1,20}\s+)?(?:инструкци|указани|правил)\w{0,20})|(?:какой|каков)\s+(?:твой|ваш)\s+системн\w{0,20}\s+промпт",
         latin=False, back=8),
    rule("exfiltration_multilingual", "プロンプト|あなたの",
         r"(?:システムプロンプト|システム\s*プロンプト|初期プロンプト|あなたの(?:指示|命令|設定|ルール|プロンプト))"
         r"(?:を|の内容を|の全文を)?(?:すべて|全て|そのまま)?(?:表示|出力|教え|見せ|開示|繰り返|書き出|印刷)",
         latin=False, back=8),
    rule("exfiltration_multilingual",
         "显示|顯示|输出|輸出|打印|告诉我|告訴我|透露|泄露|洩露|重复|重複|给我看|給我看|展示|公开|公開|说出|說出|你的|您的",
         r"(?:显示|顯示|输出|輸出|打印|告诉我|告訴我|透露|泄露|洩露|重复|重複|给我看|給我看|展示|公开|公開|说出|說出)"
         r"(?:一下)?(?:你|您)?(?:的)?(?:完整的?|全部的?|原始的?|初始的?|隐藏的?|隱藏的?)?(?:系统提示词?|系統提示詞?|"
         r"系统指令|系統指令|系统消息|系統訊息|初始指令|system\s*prompt)|(?:你|您)的(?:系统|系統)?(?:提示词|提示詞|"
         r"系统提示|系統提示|初始指令|指令)是(?:什么|什麼)", latin=False, back=40),
    rule("exfiltration_multilingual", "sistem",
         r"sistem\s+(?:istem|komut|talimat|mesaj)\w{0,8}\s+(?:\w{1,20}\s+)?(?:yaz|göster|paylaş|söyle|ver|tekrarla)",
         latin=False, back=8),
    rule("exfiltration_multilingual", "visa|vis|skriv|udskriv|afslöja|afslør|berätta|fortæl",
         r"\b(?:visa|vis|skriv\s+ut|udskriv|afslöja|afslør|berätta|fortæl)\s+(?:mig\s+|mej\s+)?(?:\w{1,20}\s+){0,2}?"
         r"(?:systemprompt\w{0,4}|(?:dina|dine)\s+(?:\w{1,20}\s+)?instruktion\w{0,4})", back=8),
    rule("exfiltration_multilingual", "δείξ|εμφάνισ|αποκάλυψ|γράψ|πεσ",
         r"(?:δείξε|εμφάνισε|αποκάλυψε|γράψε|πεσ\s+μου)\s+(?:\w{1,20}\s+){0,3}?(?:οδηγίεσ|prompt|μήνυμα\s+συστήματοσ|"
         r"προτροπή\s+συστήματοσ)", latin=False, back=8),
    rule("exfiltration_multilingual", "hiển thị|cho tôi xem|tiết lộ|in ra|viết ra",
         r"(?:hiển\s+thị|cho\s+tôi\s+xem|tiết\s+lộ|in\s+ra|viết\s+ra)\s+(?:\w{1,12}\s+){0,3}?(?:lời\s+nhắc\s+hệ\s+thống|"
         r"system\s+prompt|hướng\s+dẫn\s+của\s+bạn)", latin=False, back=8),
    rule("exfiltration_multilingual", "프롬프트",
         r"시스템\s*프롬프트(?:를|을)?\s*(?:보여|출력|알려|공개)", latin=False, back=8),
)
