// Showing the server's errors where they belong: a field the error names gets the message
// inline; anything else goes to the top of the form. The server's message names the bad value.
import { formError, setFieldError, clearFieldErrors } from "./dom.js";

export function errorText(err) {
  return err.code && !String(err.code).startsWith("http_") ? `${err.message} (${err.code})` : err.message;
}

// fieldFor(code, err) -> an input element or null
export function showApiError(form, err, fieldFor = () => null) {
  clearFieldErrors(form);
  const target = fieldFor(err.code || "", err);
  if (target) {
    setFieldError(target, errorText(err));
    target.focus();
  } else {
    formError(form, errorText(err));
  }
}

// a map of {code or "prefix.*": input} turned into a fieldFor function
export function byCode(map) {
  return (code) => {
    if (map[code]) return map[code];
    for (const [key, el] of Object.entries(map)) {
      if (key.endsWith("*") && code.startsWith(key.slice(0, -1))) return el;
    }
    return null;
  };
}

export function onSubmit(form, handler) {
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const btn = form.querySelector("button[type=submit]");
    if (btn) btn.disabled = true;
    clearFieldErrors(form);
    try { await handler(); } finally { if (btn) btn.disabled = false; }
  });
}
