// Loaded on pages with widgets, between require.js and the widgets' HTML manager
// (nb_ipywidgets_js in _config.yml). Checked by tests/built_book/test_browser.py.
(function () {
  // The theme's Font Awesome script swaps <i class="fa ..."> icons for <svg>s, by default also
  // inside widgets drawn later; ipywidgets' Play button then cannot switch its <i> icon and throws
  // (on play, pause, or a slider reaching its end). Convert only the icons the page loads with.
  window.FontAwesomeConfig = Object.assign(window.FontAwesomeConfig || {}, {observeMutations: false});

  // The HTML manager's bundles find their fonts (the icons of the Play button) next to their AMD
  // module names, which require.js resolves against the page's folder: map the names onto
  // _static/npm/html-manager, where the bundle and its fonts are served from.
  var root = new URL("npm/html-manager", document.currentScript.src).href;
  require.config({paths: {"@jupyter-widgets": root, "@jupyter-widgets/html-manager/dist": root}});

  // ipywidgets typesets widget labels with MathJax 2's API (MathJax.Hub.Queue), and throws where
  // MathJax 3 is loaded, as in this book. Translate the call once MathJax 3 has started.
  document.addEventListener("DOMContentLoaded", function () {
    var mathjax = window.MathJax;
    if (!mathjax || mathjax.Hub) return;
    mathjax.Hub = {
      Queue: function (job) {
        if (mathjax.startup && mathjax.typesetPromise && job && job[2]) {
          mathjax.startup.promise.then(function () { return mathjax.typesetPromise([job[2]]); });
        }
      },
    };
  });
})();
