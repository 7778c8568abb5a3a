"""The page's stylesheet: readable, reachable and operable for everyone who opens it.

* **Contrast**: secondary text (a toggle's help, labels' info, the status line) at least
  4.5:1 on its background (WCAG AA): Gradio's default grey for it is ~1.9:1 on white.
* **Focus**: every control shows a visible ring when it has the keyboard's focus.
* **Touch targets**: on a phone every button and toggle row is at least 44 px tall.
* **Fork cards**: a fork's alternatives side by side, wrapping on narrow screens.

Browser tests measure these from computed styles (``tests/test_browser_layout.py``).
"""

STUDIO_CSS = """
:root, .dark {
  --block-info-text-color: #4b5563;      /* 7.6:1 on white */
  --body-text-color-subdued: #4b5563;
  --checkbox-label-text-color-selected: #1f2937;
}
.dark { --block-info-text-color: #d1d5db; --body-text-color-subdued: #d1d5db; }
button:focus-visible, input:focus-visible, textarea:focus-visible, select:focus-visible,
[role="button"]:focus-visible, summary:focus-visible, .label-wrap:focus-visible {
  outline: 3px solid #1d4ed8 !important;
  outline-offset: 2px !important;
}
input[type="checkbox"]:focus-visible, input[type="radio"]:focus-visible {
  outline: 3px solid #1d4ed8 !important;
  outline-offset: 2px !important;
  box-shadow: 0 0 0 5px #bfdbfe !important;
}
#banner { min-height: 1.6em; }
#dialogue .examples { grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)) !important; gap: 6px !important; }
#dialogue .example { padding: 6px 10px !important; min-height: 44px; }
#run-controls button { min-height: 44px; }
#model-info p { margin: 0; }
#fork-choices .wrap {
  display: grid !important;
  grid-template-columns: repeat(auto-fill, minmax(230px, 1fr));
  gap: 8px;
}
#fork-choices .wrap label { align-items: flex-start; white-space: normal; min-height: 44px; }
@media (max-width: 768px) {
  button, .label-wrap, #sample-intents button, label:has(input[type="checkbox"]),
  label:has(input[type="radio"]) { min-height: 44px !important; }
}
"""
