// mistral-deploy gateway checks, run by nginx's njs module (the same file locally and on the VM).
// Written for njs 0.7 (Debian 12's libnginx-mod-http-js) and later (the official nginx image's).
//
// keyHash: the SHA-256 of the presented bearer key. The gateway holds only these hashes (the keys
//   map include), so nothing stored or shipped with the gateway can be used to call the endpoint.
// checkBody: a generation or embedding request's caps, checked before the engine sees it: completions
//   per request (n, best_of), prompts per request, output length. The limits come from the
//   location's $md_max_* variables (recipe `limits:`); the probe key may ask for one token only.
//   With a guardrail ($md_guardrail, recipe `guardrail:`), a chat request's messages start with it (a
//   client's own first system message is joined after it, after a blank line) and the rewritten body goes
//   to the engine; what could drop or cut it is refused: raw completions, a request's own chat template,
//   a prompt truncated from the left.
var crypto = require('crypto');

var KEY_RE = /^[A-Za-z0-9_-]{20,200}$/;

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
    return crypto.createHash('sha256').update(key).digest('hex');
}

function refuse(r, message, status) {
    status = status || 400;
    r.headersOut['Content-Type'] = 'application/json';
    r.return(status, JSON.stringify({error: {message: message, type: 'invalid_request_error', code: status}}) + '\n');
}

// Puts the guardrail first in a chat request's messages; returns why the request cannot have it, or null.
function guard(body, prompt) {
    var fields = ['chat_template', 'truncate_prompt_tokens'];
    for (var i = 0; i < fields.length; i++) {
        if (body[fields[i]] !== undefined && body[fields[i]] !== null) {
            return fields[i] + ': not accepted on this endpoint (its guardrail system prompt comes first)';
        }
    }
    var messages = body.messages;
    if (!Array.isArray(messages) || messages.length === 0) {
        return 'messages: expected a non-empty list of messages';
    }
    var first = messages[0];
    if (first !== null && typeof first === 'object' && first.role === 'system') {
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
    var body;
    try {
        body = JSON.parse(r.requestText || '');
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
    if (probe && body.max_tokens !== 1 && body.max_completion_tokens !== 1 && body.input === undefined) {
        return refuse(r, 'the readiness probe key may ask for one token only (max_tokens: 1)');
    }
    var count = Math.max(prompts(body.prompt), prompts(body.input));
    if (count > maxBatch) {
        return refuse(r, 'at most ' + maxBatch + ' prompts per request on this endpoint, got ' + count);
    }
    var guardrail = r.variables.md_guardrail;
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
            r.variables.md_body = JSON.stringify(body);
            return r.internalRedirect('@engine_guarded');
        }
    }
    r.internalRedirect('@engine');
}

export default {keyHash, checkBody};
