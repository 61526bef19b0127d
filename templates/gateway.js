// mistral-deploy gateway checks, run by nginx's njs module (the same file locally and on the VM).
// Written for njs 0.7 (Debian 12's libnginx-mod-http-js) and later (the official nginx image's).
//
// keyHash: the SHA-256 of the presented bearer key. The gateway holds only these hashes (the keys
//   map include), so nothing stored or shipped with the gateway can be used to call the endpoint.
//   A worker started before the keys last changed (nginx's old workers finish their requests after a
//   reload, with the old map) checks the key against the keys file itself: a revoked key is refused from
//   the moment the file is written, whichever worker holds the request.
// checkBody: a generation or embedding request's caps, checked before the engine sees it: completions
//   per request (n, best_of), prompts per request, output length. The limits come from the
//   location's $md_max_* variables (recipe `limits:`); the probe key may ask for one token only.
//   The body's cost to the gateway is bounded before it is parsed: its size (client_max_body_size), the
//   time it took to arrive, and how many arrays and objects it holds.
//   With a guardrail ($md_guardrail, recipe `guardrail:`), a chat request's messages must start with the
//   user (after at most one system message of the client's, joined after the guardrail); the guardrail goes
//   first and the rewritten body goes to the engine; what could drop or cut it is refused: raw completions,
//   a request's own chat template, a prompt truncated from the left, other message orders.
//   A chat message's media (image_url, audio_url, video_url parts) is taken as a base64 data: URL, or as an
//   http(s) URL of a host the recipe allows ($md_media_domains, the engine's --allowed-media-domains); any
//   other URL (the cloud's metadata service, a private address, file:) is refused here, never fetched; a
//   data: URL larger than $md_max_media bytes decoded (recipe limits.max_media_size) is refused too.
// modelsHeaders/modelsBody: /v1/models without the engine's local model path (`root`).
var crypto = require('crypto');
var fs = require('fs');

var KEY_RE = /^[A-Za-z0-9_-]{20,200}$/;
// How long after the keys file changed a request is checked against the file itself: covers the old
// workers, which finish requests begun before the reload, and the moment between the file's write and
// the reload.
var KEYS_RECHECK_MS = 5000;
// Arrays and objects a body may hold: JSON.parse makes ~150 bytes of each, held until the request ends.
var MAX_CONTAINERS = 20000;
// Integers beyond what a double holds exactly (2^53): kept as written when the body is rewritten.
var LONG_DIGITS_RE = /[0-9]{16}/;
var ROLES = {system: 1, user: 1, assistant: 1, tool: 1};

// Media parts of a chat message that name a URL the engine would fetch.
var MEDIA_PARTS = ['image_url', 'audio_url', 'video_url'];
var DATA_URL_RE = /^data:/i;
// scheme, then the host alone: no user info (`user@host`), no backslash tricks
var HTTP_URL_RE = /^https?:\/\/([A-Za-z0-9.-]+)(?::[0-9]{1,5})?(?:[\/?#]|$)/;

// The bytes base64 text decodes to (padding not counted).
function base64Bytes(text) {
    var pad = text.charAt(text.length - 1) !== '=' ? 0 : text.charAt(text.length - 2) === '=' ? 2 : 1;
    return Math.floor(text.length / 4) * 3 + Math.max(0, (text.length % 4) - 1) - pad;
}

// The bytes a data: URL carries: its payload after the comma, decoded when it says ;base64, else as written.
function dataUrlBytes(url) {
    var comma = url.indexOf(',');
    if (comma < 0) {
        return 0;
    }
    var payload = url.substring(comma + 1);
    return /;base64$/i.test(url.substring(0, comma)) ? base64Bytes(payload) : payload.length;
}

function overMedia(where, size, maxBytes) {
    return where + ': ' + size + ' bytes, more than this endpoint takes in one part (at most ' + maxBytes + ')';
}

// Why a chat request's media cannot be taken, or null.
function mediaProblem(body, domains, maxBytes) {
    var messages = body.messages;
    if (!Array.isArray(messages)) {
        return null;
    }
    var allowed = domains ? domains.split(' ') : [];
    for (var i = 0; i < messages.length; i++) {
        var content = messages[i] && messages[i].content;
        if (!Array.isArray(content)) {
            continue;
        }
        for (var j = 0; j < content.length; j++) {
            var part = content[j];
            if (!part || typeof part !== 'object') {
                continue;
            }
            // audio given inline (OpenAI's input_audio: raw base64, no URL)
            var audio = part.input_audio;
            if (maxBytes && audio && typeof audio === 'object' && typeof audio.data === 'string'
                && base64Bytes(audio.data) > maxBytes) {
                return overMedia('messages[' + i + '].content[' + j + '].input_audio', base64Bytes(audio.data),
                                 maxBytes);
            }
            for (var k = 0; k < MEDIA_PARTS.length; k++) {
                var ref = part[MEDIA_PARTS[k]];
                if (ref === undefined || ref === null) {
                    continue;
                }
                var url = typeof ref === 'object' ? ref.url : ref;
                if (typeof url === 'string' && DATA_URL_RE.test(url)) {
                    var size = maxBytes ? dataUrlBytes(url) : 0;
                    if (size > maxBytes) {
                        return overMedia('messages[' + i + '].content[' + j + '].' + MEDIA_PARTS[k], size, maxBytes);
                    }
                    continue;
                }
                var host = typeof url === 'string' ? url.match(HTTP_URL_RE) : null;
                if (host && allowed.indexOf(host[1].toLowerCase()) >= 0) {
                    continue;
                }
                return 'messages[' + i + '].content[' + j + '].' + MEDIA_PARTS[k] + ': this endpoint takes media as '
                    + 'base64 data: URLs' + (allowed.length ? ', or http(s) URLs of ' + allowed.join(', ') : '')
                    + '; it fetches no other URL';
            }
        }
    }
    return null;
}

// Is this hash still in the keys file? Only asked within KEYS_RECHECK_MS of the file's last change.
function listed(r, hash) {
    var file = r.variables.md_keys_file;
    if (!file || !hash) {
        return true;
    }
    var stat;
    try {
        stat = fs.statSync(file);
    } catch (e) {
        return true;  // no file to ask: the worker's map decides, as before
    }
    var started = Date.now() - Number(r.variables.request_time) * 1000;
    if (started > stat.mtimeMs + KEYS_RECHECK_MS) {
        return true;
    }
    try {
        return fs.readFileSync(file, 'utf8').indexOf('"' + hash + '"') >= 0;
    } catch (e) {
        return false;
    }
}

function keyHash(r) {
    var header = r.headersIn.Authorization;
    // only the scheme word is case-insensitive (RFC 9110); the key itself is compared exactly
    if (!header || header.length < 27 || header.slice(0, 7).toLowerCase() !== 'bearer ') {
        return '';
    }
    var key = header.slice(7);
    if (!KEY_RE.test(key)) {
        return '';
    }
    var hash = crypto.createHash('sha256').update(key).digest('hex');
    return listed(r, hash) ? hash : '';
}

function refuse(r, message, status, type) {
    status = status || 400;
    r.headersOut['Content-Type'] = 'application/json';
    r.return(status, JSON.stringify({error: {message: message, type: type || 'invalid_request_error', code: status}})
             + '\n');
}

function notFound(r) {
    refuse(r, 'not found', 404, 'not_found');
}

function unauthorized(r) {
    r.headersOut['WWW-Authenticate'] = 'Bearer realm="mistral-deploy"';
    refuse(r, 'missing or invalid API key', 401, 'authentication_error');
}

// How many arrays and objects the text may hold, counted up to `limit` (brackets inside strings count too:
// an upper bound, found by the native indexOf).
function containersOver(text, limit) {
    var count = 0;
    var marks = ['[', '{'];
    for (var m = 0; m < marks.length; m++) {
        var at = text.indexOf(marks[m]);
        while (at >= 0) {
            if (++count > limit) {
                return true;
            }
            at = text.indexOf(marks[m], at + 1);
        }
    }
    return false;
}

// The body with every number token of 16 digits or more (outside strings) replaced by a placeholder
// string, and the tokens, so that a rewritten body keeps them exact: {text, numbers}.
function shieldNumbers(text) {
    var out = [];
    var numbers = [];
    var inString = false;
    var last = 0;
    for (var i = 0; i < text.length; i++) {
        var c = text.charCodeAt(i);
        if (inString) {
            if (c === 92) {  // backslash: skip the escaped character
                i++;
            } else if (c === 34) {
                inString = false;
            }
            continue;
        }
        if (c === 34) {
            inString = true;
        } else if (c === 45 || (c >= 48 && c <= 57)) {
            var end = i;
            while (end < text.length && /[-+0-9.eE]/.test(text[end])) {
                end++;
            }
            var token = text.slice(i, end);
            if (LONG_DIGITS_RE.test(token)) {
                out.push(text.slice(last, i), '"\\u0001md' + numbers.length + '\\u0001"');
                numbers.push(token);
                last = end;
            }
            i = end - 1;
        }
    }
    out.push(text.slice(last));
    return {text: out.join(''), numbers: numbers};
}

function unshieldNumbers(text, numbers) {
    for (var i = 0; i < numbers.length; i++) {
        text = text.replace('"\\u0001md' + i + '\\u0001"', numbers[i]);
    }
    return text;
}

// Puts the guardrail first in a chat request's messages; returns why the request cannot have it, or null.
// What the engine gets is [system: guardrail (+ the client's own system text)], then turns that start with
// the user: every chat template puts a leading system message into such a prompt.
function guard(body, prompt) {
    var fields = ['chat_template', 'truncate_prompt_tokens'];
    for (var i = 0; i < fields.length; i++) {
        if (body[fields[i]] !== undefined && body[fields[i]] !== null) {
            return fields[i] + ': not accepted on this endpoint (its guardrail system prompt comes first)';
        }
    }
    var kwargs = body.chat_template_kwargs;
    if (kwargs !== undefined && kwargs !== null) {
        if (typeof kwargs !== 'object' || Array.isArray(kwargs)) {
            return 'chat_template_kwargs: expected an object';
        }
        var names = Object.keys(kwargs);
        for (i = 0; i < names.length; i++) {
            if (!/^(enable_thinking|thinking|reasoning_effort)$/.test(names[i])) {
                return 'chat_template_kwargs.' + names[i] + ': not accepted on this endpoint (its guardrail '
                       + 'system prompt comes first)';
            }
        }
    }
    var messages = body.messages;
    if (!Array.isArray(messages) || messages.length === 0) {
        return 'messages: expected a non-empty list of messages';
    }
    for (i = 0; i < messages.length; i++) {
        var message = messages[i];
        if (message === null || typeof message !== 'object' || Array.isArray(message)) {
            return 'messages[' + i + ']: expected an object';
        }
        if (typeof message.role !== 'string' || !ROLES.hasOwnProperty(message.role)) {
            return 'messages[' + i + '].role: expected one of system, user, assistant, tool';
        }
        if (message.role === 'system' && i > 0) {
            return 'messages[' + i + '].role: a system message only first, on this endpoint (its guardrail '
                   + 'system prompt comes first)';
        }
    }
    var first = messages[0];
    var opening = first.role === 'system' ? 1 : 0;
    if (opening >= messages.length || messages[opening].role !== 'user') {
        return 'messages[' + opening + '].role: the conversation must start with a user message on this endpoint '
               + '(after at most one system message)';
    }
    if (opening) {
        if (typeof first.content === 'string') {
            first.content = prompt + '\n\n' + first.content;
        } else if (Array.isArray(first.content)) {
            first.content.unshift({type: 'text', text: prompt});
        } else {
            first.content = prompt;
        }
    } else {
        messages.unshift({role: 'system', content: prompt});
    }
    return null;
}

// How many prompts a prompt/input field holds: a string or a list of token ids is one; a list of
// strings or of token lists is one each.
function prompts(value) {
    if (!Array.isArray(value) || value.length === 0 || typeof value[0] === 'number') {
        return 1;
    }
    return value.length;
}

function overCap(body, names, cap) {
    for (var i = 0; i < names.length; i++) {
        var value = body[names[i]];
        if (value !== undefined && value !== null && (typeof value !== 'number' || value > cap)) {
            return names[i];
        }
    }
    return null;
}

function checkBody(r) {
    var text;
    try {
        text = r.requestText || '';
    } catch (e) {
        // nginx wrote the body to a file: it outgrew the gateway's buffer (client_body_buffer_size)
        return refuse(r, 'the request body is too large for this endpoint (at most ' + r.variables.md_max_body
                      + ')', 413);
    }
    var took = Number(r.variables.request_time);
    var allowed = Number(r.variables.md_body_total_timeout);
    if (allowed && took > allowed) {
        return refuse(r, 'the request took ' + took + ' s to arrive, longer than this endpoint allows (' + allowed
                      + ' s)', 408);
    }
    // the key is asked again now that the body is here: it may have been revoked while the body arrived
    if (!listed(r, r.variables.md_key_hash)) {
        return unauthorized(r);
    }
    if (containersOver(text, MAX_CONTAINERS)) {
        return refuse(r, 'the request body holds more than ' + MAX_CONTAINERS + ' JSON arrays and objects');
    }
    var guardrail = r.variables.md_guardrail;
    var shielded = null;
    if (guardrail && r.uri === '/v1/chat/completions' && LONG_DIGITS_RE.test(text)) {
        shielded = shieldNumbers(text);
        text = shielded.text;
    }
    var body;
    try {
        body = JSON.parse(text);
    } catch (e) {
        return refuse(r, 'the request body is not valid JSON');
    }
    if (typeof body !== 'object' || body === null || Array.isArray(body)) {
        return refuse(r, 'the request body must be a JSON object');
    }
    var probe = r.variables.md_key_id === 'probe';
    var maxN = probe ? 1 : Number(r.variables.md_max_n);
    var maxTokens = probe ? 1 : Number(r.variables.md_max_tokens);
    var maxBatch = probe ? 1 : Number(r.variables.md_max_batch);
    var field = overCap(body, ['n', 'best_of'], maxN);
    if (field) {
        return refuse(r, field + ': at most ' + maxN + ' completions per request on this endpoint');
    }
    field = overCap(body, ['max_tokens', 'max_completion_tokens'], maxTokens);
    if (field) {
        return refuse(r, field + ': at most ' + maxTokens + ' output tokens per completion on this endpoint');
    }
    // the readiness probe key generates one token, whatever else the body holds
    if (probe && r.uri !== '/v1/embeddings' && body.max_tokens !== 1 && body.max_completion_tokens !== 1) {
        return refuse(r, 'the readiness probe key may ask for one token only (max_tokens: 1)');
    }
    var count = Math.max(prompts(body.prompt), prompts(body.input));
    if (count > maxBatch) {
        return refuse(r, 'at most ' + maxBatch + ' prompts per request on this endpoint, got ' + count);
    }
    if (r.uri === '/v1/chat/completions') {
        var media = mediaProblem(body, r.variables.md_media_domains, Number(r.variables.md_max_media));
        if (media) {
            return refuse(r, media);
        }
    }
    if (guardrail) {
        // the readiness probe's one-token completion is the only raw completion let through
        if (r.uri === '/v1/completions' && !probe) {
            return refuse(r, 'this endpoint starts every chat with a guardrail system prompt: raw completions '
                          + '(/v1/completions) are closed, use /v1/chat/completions', 403);
        }
        if (r.uri === '/v1/chat/completions') {
            var why = guard(body, guardrail);
            if (why) {
                return refuse(r, why);
            }
            var rewritten = JSON.stringify(body);
            r.variables.md_body = shielded ? unshieldNumbers(rewritten, shielded.numbers) : rewritten;
            return r.internalRedirect('@engine_guarded');
        }
    }
    r.internalRedirect('@engine');
}

// /v1/models: the engine names the model's local folder (or bucket) in `root`; the client gets the served
// name there. A regular expression, not JSON.parse: this is the route the gateway serves fastest.
var ROOT_RE = /"root":"(?:[^"\\]|\\.)*"/g;

function modelsHeaders(r) {
    delete r.headersOut['Content-Length'];
}

var modelsText = '';  // per request: each request runs in a VM of its own

function modelsBody(r, data, flags) {
    modelsText += data;
    if (flags.last) {
        r.sendBuffer(modelsText.replace(ROOT_RE, '"root":' + JSON.stringify(r.variables.md_served_model)), flags);
    }
}

export default {keyHash, checkBody, unauthorized, notFound, modelsHeaders, modelsBody};
